"""The head sensitivity table: measured through the compression machinery, stored in the profile (schema 2), read
back from schema 1 files, and spent by the profile budget within the same entries and bytes."""

import json
import struct

import pytest
import torch

from audiokv_cli.compression.budgets import BudgetContext, ProfileBudget, profile_budget_table, sensitivity_budget_table
from audiokv_cli.compression.byte_budget import full_bytes_16bit
from audiokv_cli.compression.methods import MethodOptions, build_policy
from audiokv_cli.compression.policy import apply_policy
from audiokv_cli.models import load_adapter
from audiokv_cli.profiling.profile_file import HeadProfile, ProfileError, load_profile, merge_profiles, save_profile
from audiokv_cli.profiling.sensitivity import (
    ClipRuns,
    HeadSensitivity,
    clip_sensitivity,
    kl_per_position,
    one_head_policy,
    transcript_tokens,
)
from audiokv_cli.profiling.statistics import HeadStatistics
from audiokv_cli.testing.families import build_random_whisper
from tests.adapter_checks import noise_clip

STRENGTHS = (2, 4, 8)


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    path = build_random_whisper(tmp_path_factory.mktemp("tiny-whisper"))
    return load_adapter(str(path), device="cpu", dtype="float32")


def test_a_head_of_identical_entries_costs_nothing_and_the_others_do(whisper):
    # Layer 1, head 2 reads zero keys and the value projection's bias at every frame: all its entries are equal, so
    # merging any of them is exact and its sensitivity must be 0 (up to float rounding of the means). The other
    # heads' keys are scaled up so their attention is peaked enough (random weights, noise) for merging to show.
    layers = [layer.encoder_attn for layer in whisper.model.model.decoder.layers]
    dim = whisper.geometry.head_dim
    saved = [(a.k_proj.weight.clone(), a.v_proj.weight.clone()) for a in layers]
    try:
        with torch.no_grad():
            for attention in layers:
                attention.k_proj.weight.mul_(30.0)
            layers[1].k_proj.weight[2 * dim : 3 * dim] = 0
            layers[1].v_proj.weight[2 * dim : 3 * dim] = 0
        sums, positions = clip_sensitivity(whisper, noise_clip(3.0, seed=2), "abc de", STRENGTHS, max_tokens=20)
    finally:
        with torch.no_grad():
            for attention, (keys, values) in zip(layers, saved):
                attention.k_proj.weight.copy_(keys)
                attention.v_proj.weight.copy_(values)
    assert positions >= 5  # the transcript's tokens, then the end token
    assert sums.shape == (2, 4, len(STRENGTHS))
    others = torch.ones(2, 4, dtype=torch.bool)
    others[1, 2] = False
    assert float(sums[others][:, 1:].min()) > 1e-7
    assert float(sums[1, 2].max()) < 1e-3 * float(sums[others][:, 1:].min())
    # Merging more never costs less in this table's measure for the heads that matter most.
    top = sums.reshape(-1, len(STRENGTHS))[sums[..., -1].flatten().argmax()]
    assert float(top[-1]) >= float(top[0])


def test_reference_run_equals_the_uncompressed_model(whisper):
    """The reference (no head cut) is the model's own prediction: the same logits as Whisper without audiokv."""
    prepared = whisper.prepare(noise_clip(2.0, seed=3))
    runs = ClipRuns(whisper, prepared)
    tokens = transcript_tokens(whisper, "ab c", 20)
    reference = runs.logits(one_head_policy(None, 0, 2), tokens)
    ids = torch.cat([prepared.input_ids, torch.tensor([tokens[:-1]])], dim=1)
    with torch.no_grad():
        dense = whisper.model(input_features=prepared.inputs["input_features"], decoder_input_ids=ids).logits[0]
    assert torch.allclose(reference, dense[prepared.prompt_tokens - 1 :], atol=1e-4)
    assert float(kl_per_position(reference, reference).max()) == 0.0


def test_decoder_only_one_pass_equals_step_by_step(random_adapter):
    from audiokv_cli.runtime.attention import use_attention_handler
    from audiokv_cli.compression.policy import CompressionSession

    prepared = random_adapter.prepare(noise_clip(1.5, seed=4))
    tokens = transcript_tokens(random_adapter, "alpha bravo", 12)
    policy = one_head_policy(1, 0, 4)
    one_pass = ClipRuns(random_adapter, prepared).logits(policy, tokens)
    session = CompressionSession(one_head_policy(1, 0, 4), random_adapter, prepared)
    with use_attention_handler(random_adapter, session), torch.no_grad():
        rows = [random_adapter.next_token_logits(prepared.inputs, session.model_cache)]
        for token in tokens[:-1]:
            rows.append(random_adapter.next_token_logits({"input_ids": torch.tensor([[token]])}, session.model_cache))
    assert torch.allclose(one_pass, torch.cat(rows), atol=1e-4)


# ------------------------------------------------------------------------------------------------------ allocation


def _context(retention=0.2, layers=2, heads=4, length=600, window=0):
    return BudgetContext(
        retention=retention, prompt_len=length, window=window, num_layers=layers, num_kv_heads=heads,
        num_query_heads=heads, audio_spans=((0, length),),
    )


def test_more_sensitive_heads_keep_more_and_the_total_is_uniforms():
    ctx = _context()
    # Head i costs i times more than head 0 at every strength.
    weight = torch.arange(1, 9, dtype=torch.float64).view(2, 4, 1)
    sensitivity = weight * torch.tensor([0.01, 0.03, 0.08], dtype=torch.float64)
    table = sensitivity_budget_table(sensitivity, STRENGTHS, ctx)
    flat = table.flatten()
    assert int(table.sum()) == 8 * ctx.per_head
    assert torch.all(flat[1:] >= flat[:-1]) and flat[-1] > flat[0]
    assert int(table.min()) >= 75 and int(table.max()) <= 600  # the floor: one entry per largest strength
    # Heads the table cannot tell apart share evenly.
    even = sensitivity_budget_table(torch.zeros(2, 4, 3, dtype=torch.float64), STRENGTHS, ctx)
    assert int(even.max()) - int(even.min()) <= 1 and int(even.sum()) == 8 * ctx.per_head


def test_forced_positions_stay_with_every_head():
    ctx = _context(window=32)
    sensitivity = torch.rand(2, 4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    table = sensitivity_budget_table(sensitivity, STRENGTHS, ctx)
    assert int(table.sum()) == 8 * ctx.per_head and int(table.min()) >= ctx.num_forced


def test_kv_budget_with_sensitivity_stays_within_the_bytes(whisper):
    geometry = whisper.geometry
    sensitivity = torch.zeros(2, 4, len(STRENGTHS), dtype=torch.float64)
    sensitivity[1, 3] = torch.tensor([0.5, 1.0, 2.0])  # one head that matters, the rest free to merge
    sensitivity[0, 0] = torch.tensor([0.05, 0.1, 0.2])
    # the per-head cache (under a budget audiokv would keep Whisper's encoder output once: no heads to split)
    options = MethodOptions(
        head_scores=torch.ones(2, 4), kv_budget=0.05, cross_store="kv",
        head_sensitivity=HeadSensitivity(sensitivity, STRENGTHS, positions=10, clips=1),
    )
    policy = build_policy("audiokv", 1.0, options)
    prepared = whisper.prepare(noise_clip(4.0, seed=5))
    with apply_policy(policy, whisper, prepared) as session, torch.no_grad():
        whisper.next_token_logits(prepared.inputs, session.model_cache)
    kept = torch.tensor(session.summary()["kept"])
    assert kept[1, 3] == kept.max() and kept[0, 0] > kept[0, 1] and kept[0, 1] == kept.min()
    full = full_bytes_16bit(prepared.compressed_length, geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
    assert session.kept_bytes() <= 0.05 * full
    # The same budget without the table keeps (almost) the same number of entries, spread by eq. 1 instead.
    plain = build_policy("audiokv", 1.0, MethodOptions(head_scores=torch.ones(2, 4), kv_budget=0.05, cross_store="kv"))
    with apply_policy(plain, whisper, prepared) as uniform, torch.no_grad():
        whisper.next_token_logits(prepared.inputs, uniform.model_cache)
    assert int(torch.tensor(uniform.summary()["kept"]).sum()) == int(kept.sum())


def test_the_table_splits_merged_entries_only(whisper):
    """The table measures heads whose evicted entries are merged: a run that drops them (retention alone, merge
    none) splits its entries by the attention profile, exactly as a profile without the table."""
    sensitivity = torch.zeros(2, 4, len(STRENGTHS), dtype=torch.float64)
    sensitivity[1, 3] = torch.tensor([0.5, 1.0, 2.0])
    table = HeadSensitivity(sensitivity, STRENGTHS, positions=10, clips=1)
    scores = torch.arange(8, dtype=torch.float32).reshape(2, 4)
    prepared = whisper.prepare(noise_clip(4.0, seed=6))

    def kept(**options):
        policy = build_policy("audiokv", 0.3, MethodOptions(head_scores=scores, **options))
        with apply_policy(policy, whisper, prepared) as session, torch.no_grad():
            whisper.next_token_logits(prepared.inputs, session.model_cache)
        return session.summary()["kept"]

    assert kept(head_sensitivity=table) == kept()  # dropped: the attention profile decides
    merged = kept(head_sensitivity=table, merge="mean")
    assert merged != kept(merge="mean") and merged[1][3] == max(max(row) for row in merged)


def test_a_decoder_only_prompt_cache_splits_by_the_attention_profile(random_adapter):
    """On a decoder-only prompt cache the table's split cost WER (tiny, development set), so eq. 1 splits its
    entries, merged or not, exactly as a profile without the table."""
    geometry = random_adapter.geometry
    layers, kv_heads = geometry.num_layers, geometry.num_kv_heads
    sensitivity = torch.zeros(layers, kv_heads, len(STRENGTHS), dtype=torch.float64)
    sensitivity[0, 0] = torch.tensor([0.5, 1.0, 2.0])  # the head eq. 1 ranks lowest
    table = HeadSensitivity(sensitivity, STRENGTHS, positions=10, clips=1)
    scores = torch.arange(layers * geometry.num_query_heads, dtype=torch.float32).reshape(layers, -1)
    prepared = random_adapter.prepare(noise_clip(8.0, seed=6))

    def kept(**options):
        policy = build_policy("audiokv", 0.3, MethodOptions(head_scores=scores, merge="mean", **options))
        with apply_policy(policy, random_adapter, prepared) as session, torch.no_grad():
            random_adapter.next_token_logits(prepared.inputs, session.model_cache)
        return session.summary()["kept"]

    split = kept()
    assert kept(head_sensitivity=table) == split and split[0][0] < split[-1][-1]  # eq. 1: the top-scored head most


# ---------------------------------------------------------------------------------------------------- the file


FINGERPRINT = {
    "model_type": "whisper", "name_or_path": "tiny", "revision": None, "num_layers": 2, "num_query_heads": 4,
    "num_kv_heads": 4, "head_dim": 16, "hidden_size": 64,
}


def _profile(sensitivity: HeadSensitivity | None = None, clip: str = "c0") -> HeadProfile:
    stats = HeadStatistics.zeros(2, 4, 4)
    stats.steps += 3
    provenance = {
        "statistic": "topk_hits", "aligner": "manifest", "top_k": 4, "min_confidence": 0.95, "decoding": "greedy",
        "data": [[clip, "0" * 64]], "clips": 1,
    }
    return HeadProfile(stats, dict(FINGERPRINT), provenance, sensitivity=sensitivity)


def _set_schema_version(path, version: int) -> None:
    """Rewrite the safetensors header's metadata with another schema version (the tensors stay byte for byte)."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    meta = json.loads(header["__metadata__"]["audiokv"])
    meta["schema_version"] = version
    header["__metadata__"]["audiokv"] = json.dumps(meta)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + size :])


def test_sensitivity_round_trips_and_merges(tmp_path):
    table = torch.rand(2, 4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    path = save_profile(_profile(HeadSensitivity(table, STRENGTHS, positions=30, clips=2)), tmp_path / "p")
    loaded = load_profile(path, expect_fingerprint=FINGERPRINT)
    assert torch.equal(loaded.sensitivity.table, table) and loaded.sensitivity.strengths == STRENGTHS
    twin = json.loads((tmp_path / "p.json").read_text())
    assert twin["schema_version"] == 2 and twin["sensitivity"]["strengths"] == list(STRENGTHS)
    assert len(twin["sensitivity_table"]) == 2
    other = _profile(HeadSensitivity(torch.zeros(2, 4, 3, dtype=torch.float64), STRENGTHS, 10, 1), clip="c1")
    merged = merge_profiles([loaded, other])
    assert merged.sensitivity.positions == 40 and merged.sensitivity.clips == 3
    assert torch.allclose(merged.sensitivity.table, table * 30 / 40)


def test_version_1_file_loads_without_sensitivity_and_budgets_fall_back(tmp_path):
    path = save_profile(_profile(), tmp_path / "old")
    _set_schema_version(path, 1)
    loaded = load_profile(path)
    assert loaded.sensitivity is None
    ctx = _context()
    scores = torch.rand(2, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ProfileBudget(scores).table(ctx), profile_budget_table(scores, ctx, 0.5))


def test_unknown_future_version_is_refused_in_one_line(tmp_path):
    path = save_profile(_profile(), tmp_path / "future")
    _set_schema_version(path, 99)
    with pytest.raises(ProfileError) as error:
        load_profile(path)
    message = str(error.value)
    assert "schema version 99" in message and "\n" not in message


def test_a_damaged_sensitivity_table_is_refused(tmp_path):
    table = torch.full((2, 4, 3), float("nan"), dtype=torch.float64)
    path = save_profile(_profile(HeadSensitivity(table, STRENGTHS, 5, 1)), tmp_path / "bad")
    with pytest.raises(ProfileError, match="sensitivity"):
        load_profile(path)
