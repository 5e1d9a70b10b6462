"""The cross-attention cache kept once as the encoder output (`compression.latent`, ``--cross-store latent``).

Pure-tensor checks against attention over explicitly projected keys and values, then Whisper end to end against
the dense model run on an encoder output whose merged frames are replaced by their group's mean (a group of equal
keys is exactly one entry with log(size) added to its logit), and the byte accounting against the budget.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import audiokv_cli
from audiokv_cli import runtime
from audiokv_cli.compression import byte_budget
from audiokv_cli.compression.latent import LatentProjection, LatentStore, evenly_spaced_frames, latent_attention
from audiokv_cli.compression.methods import MethodOptions, build_policy
from audiokv_cli.compression.policy import CompressionSession
from audiokv_cli.compression.quantization import QuantConfig
from audiokv_cli.errors import AudiokvError
from audiokv_cli.models.families.whisper import WhisperAdapter
from audiokv_cli.testing.masked_dense import logit_difference
from tests.adapter_checks import noise_clip, options


def _projection(dim: int, heads: int, seed: int = 0):
    torch.manual_seed(seed)
    key = torch.nn.Linear(dim, dim, bias=True)  # a key bias shifts every logit of a query alike: it must cancel
    value = torch.nn.Linear(dim, dim, bias=True)
    return key, value, LatentProjection.from_linear(key, value, heads)


def _naive_attention(frames: torch.Tensor, key, value, query: torch.Tensor, scaling: float, bias=None):
    """One row: keys and values made explicitly, softmax per head. frames [F, D], query [H, T, d] -> [T, H, d]."""
    heads, _, head_dim = query.shape
    keys = key(frames).view(-1, heads, head_dim).transpose(0, 1)  # [H, F, d]
    values = value(frames).view(-1, heads, head_dim).transpose(0, 1)
    logits = query @ keys.transpose(1, 2) * scaling
    if bias is not None:
        logits = logits + bias
    return (torch.softmax(logits, -1) @ values).transpose(0, 1)


def test_latent_attention_equals_attention_over_the_projected_keys_and_values():
    dim, heads, steps = 32, 4, 3
    key, value, projection = _projection(dim, heads)
    frames = torch.randn(2, 10, dim)
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[1, 7:] = False  # rows of different lengths: the shorter one is padded and its padding masked
    store = LatentStore.build(frames, keep)
    expanded, bias = store.expand()
    assert store.lengths == [10, 7] and expanded.shape == (2, 10, dim)
    query = torch.randn(2, heads, steps, dim // heads)
    out = latent_attention(expanded, bias, query, projection, 0.25)
    with torch.no_grad():
        for row, n in enumerate(store.lengths):
            reference = _naive_attention(frames[row, :n], key, value, query[row], 0.25)
            torch.testing.assert_close(out[row], reference, atol=1e-5, rtol=1e-5)


def test_a_group_of_identical_frames_merged_into_one_gives_the_unmerged_attention():
    dim, heads = 16, 2
    key, value, projection = _projection(dim, heads, seed=1)
    distinct = torch.randn(5, dim)
    sizes = [1, 4, 2, 7, 3]
    frames = torch.cat([row.expand(n, dim) for row, n in zip(distinct, sizes)])[None]  # [1, 17, D]
    keep = torch.zeros(1, frames.shape[1], dtype=torch.bool)
    keep[0, torch.tensor([0] + list(torch.tensor(sizes).cumsum(0)[:-1]))] = True  # the first frame of each run
    store = LatentStore.build(frames, keep, merge="mean")
    assert store.lengths == [5]
    assert store.sizes.tolist() == sizes
    query = torch.randn(1, heads, 2, dim // heads)
    expanded, bias = store.expand()
    out = latent_attention(expanded, bias, query, projection, 0.3)
    with torch.no_grad():
        reference = _naive_attention(frames[0], key, value, query[0], 0.3)
    torch.testing.assert_close(out[0], reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [16, 8, 4, 2])
@pytest.mark.parametrize("merge", ["none", "mean"])
def test_stored_bytes_are_what_the_budget_counts(bits, merge):
    frames = torch.randn(1, 150, 128)
    keep = evenly_spaced_frames(150, 40)[None]
    store = LatentStore.build(frames, keep, QuantConfig(bits), merge)
    assert store.bits == bits and store.lengths == [40]
    assert store.row_bytes() == [byte_budget.latent_cost(40, 128, bits, merged=merge == "mean")]
    dense, _ = store.expand()
    kept = frames[0, keep[0]] if merge == "none" else None
    if kept is not None:
        # per-token codes: each element within half a step of its group's range
        step = (kept.view(40, 2, 64).amax(-1) - kept.view(40, 2, 64).amin(-1)) / (2**bits - 1 if bits < 16 else 1e4)
        error = (dense[0] - kept).abs().view(40, 2, 64).amax(-1)
        assert bool((error <= step / 2 + 2e-3).all())


def test_the_budget_buys_frames_at_16_bits_merging_up_to_2_to_1_before_it_spends_fewer_bits():
    """Whisper base's geometry (6 layers, 8 heads of 64, d_model 512, 1,500 frames); the shipped table's rule."""
    full = byte_budget.full_bytes_16bit(1500, 6, 8, 64)
    policy = dataclasses.replace(build_policy("audiokv", 1.0, options_for_whisper_base()), cross_store="latent")
    chosen = {}
    for budget in (0.25, 0.125, 0.05, 0.04, 0.025, 1 / 64, 0.005):
        resolved = byte_budget.resolve_latent(
            dataclasses.replace(policy, kv_budget=budget), frames=1500, dim=512, full_16bit=full
        )
        frames = round(resolved.retention * 1500)
        cost = byte_budget.latent_cost(frames, 512, resolved.kv_bits, resolved.merge == "mean")
        assert cost <= budget * full < cost + byte_budget.latent_cost(1, 512, resolved.kv_bits, True) or frames == 1500
        chosen[budget] = (resolved.kv_bits, frames, resolved.merge)
    assert chosen[0.25] == (16, 1500, "none") and chosen[0.125] == (16, 1500, "none")  # 1/12 of the bytes, exact
    assert chosen[0.05][0] == 16 and 750 <= chosen[0.05][1] < 1500 and chosen[0.05][2] == "mean"
    assert chosen[0.04][0] == 8 and chosen[0.025][0] == 8 and chosen[0.025][1] >= 750  # 16 bits would merge > 2:1
    assert chosen[1 / 64][0] == 4 and chosen[0.005][0] == 4 and chosen[0.005][1] < 750  # the last bits: any merge
    # bits given: every frame at those bits when they fit
    fixed = byte_budget.resolve_latent(
        dataclasses.replace(policy, kv_budget=0.05, kv_bits=8), frames=1500, dim=512, full_16bit=full
    )
    assert (fixed.kv_bits, fixed.retention, fixed.merge) == (8, 1.0, "none")
    with pytest.raises(AudiokvError, match="cannot hold one encoder frame"):
        byte_budget.resolve_latent(dataclasses.replace(policy, kv_budget=1e-6), frames=1500, dim=512, full_16bit=full)


def options_for_whisper_base() -> MethodOptions:
    return MethodOptions(head_scores=torch.ones(6, 8))


@pytest.fixture(scope="module")
def whisper(family_models):
    return family_models.adapter(WhisperAdapter)


def _groups_by_hand(encoded: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``encoded [L, D]`` with every frame replaced by the mean of its group: each dropped frame joins the kept
    frame before or after it whose vector is more similar (cosine; the one before on a tie)."""
    kept = keep.nonzero().flatten().tolist()
    owner = {}
    unit = torch.nn.functional.normalize(encoded, dim=-1)
    for frame in range(encoded.shape[0]):
        left = [k for k in kept if k <= frame]
        right = [k for k in kept if k >= frame]
        if not left:
            owner[frame] = right[0]
        elif not right:
            owner[frame] = left[-1]
        else:
            a, b = left[-1], right[0]
            owner[frame] = b if float(unit[frame] @ unit[b]) > float(unit[frame] @ unit[a]) else a
    out = encoded.clone()
    for k in kept:
        members = [f for f, o in owner.items() if o == k]
        out[members] = encoded[members].mean(0)
    return out


def _dense_logits(adapter, prepared, tokens, encoder_output=None):
    """Teacher-forced logits of the unmodified model (transformers' own caches, no audiokv attention). The prompt's
    pass is the model's own; with ``encoder_output``, the cross-attention keys and values every later step reads
    are then made from it instead (the compressed run's prefill is exact too: it compresses after attending)."""
    from transformers import DynamicCache

    cache = adapter.model_cache(DynamicCache())
    logits = []
    with torch.no_grad():
        logits.append(adapter.next_token_logits(prepared.inputs, cache))
        if encoder_output is not None:
            heads = adapter.geometry.num_kv_heads
            for layer, module in zip(cache.cross_attention_cache.layers, adapter.decoder_layers()):
                layer.keys = module.k_proj(encoder_output).unflatten(-1, (heads, -1)).transpose(1, 2)
                layer.values = module.v_proj(encoder_output).unflatten(-1, (heads, -1)).transpose(1, 2)
        for token in tokens:
            logits.append(adapter.next_token_logits({"input_ids": torch.tensor([[token]])}, cache))
    return logits


@pytest.fixture(scope="module")
def sharp_whisper(tmp_path_factory):
    """A random Whisper whose cross-attention is sharp enough that which frames it reads shows in the logits."""
    from audiokv_cli.models.registry import load_adapter
    from audiokv_cli.testing.families import build_random_whisper

    adapter = load_adapter(str(build_random_whisper(tmp_path_factory.mktemp("sharp-whisper"))), device="cpu",
                           dtype="float32")
    with torch.no_grad():
        for layer in adapter.model.model.decoder.layers:
            layer.encoder_attn.k_proj.weight.mul_(8.0)
            layer.encoder_attn.v_proj.weight.mul_(8.0)
    return adapter


def test_whisper_over_the_latent_store_equals_the_dense_model_on_the_merged_encoder_output(sharp_whisper):
    whisper = sharp_whisper
    prepared = whisper.prepare(noise_clip(6.0, seed=3))
    policy = build_policy("stride", 0.02, dataclasses.replace(options(whisper), cross_store="latent", merge="mean"))
    session = CompressionSession(policy, whisper, prepared)
    output = runtime.run(whisper, session, prepared.inputs, 5, keep_logits=True)
    assert session.cache.latent is not None and session.cache.latent.lengths == [30]
    assert all(layer.reads_latent and layer.keys is None for layer in session.cache.layers)
    with torch.no_grad():
        encoded = whisper.encode(prepared.inputs)
    merged = _groups_by_hand(encoded[0], evenly_spaced_frames(1500, 30))[None]
    reference = _dense_logits(whisper, prepared, output.tokens[0], merged)
    steps = len(output.logits)
    assert steps == 6 and len(reference) == 6
    difference = max(logit_difference(a, b) for a, b in zip(output.logits[:steps], reference[:steps]))
    assert difference <= 1e-4, difference
    full = _dense_logits(whisper, prepared, output.tokens[0])
    moved = max(logit_difference(a, b) for a, b in zip(output.logits[1:steps], full[1:steps]))
    assert moved > 1e-2, "merging frames did not change the logits: the comparison proves nothing"
    # bytes: the one store, counted once for all layers
    assert session.kept_bytes() == 30 * (whisper.geometry.hidden_size * 4 + byte_budget.BIAS_BYTES) + 8  # float32


def test_kv_budget_on_whisper_keeps_the_encoder_output_within_the_budget(whisper):
    prepared = whisper.prepare(noise_clip(4.0, seed=4))
    full16 = prepared.compressed_length * whisper.geometry.kv_bytes_per_token(torch.float16)
    for budget in (0.3, 0.1, 0.02):
        policy = build_policy("audiokv", 1.0, dataclasses.replace(options(whisper), kv_budget=budget))
        session = CompressionSession(policy, whisper, prepared)
        runtime.run(whisper, session, prepared.inputs, 3)
        assert session.policy.cross_store == "latent"
        assert 0 < session.kept_bytes() <= budget * full16
    # the per-head cache stays one option away, and is what other methods keep
    kv = build_policy("audiokv", 1.0, dataclasses.replace(options(whisper), kv_budget=0.3, cross_store="kv"))
    assert CompressionSession(kv, whisper, prepared).policy.cross_store == "kv"
    stride = build_policy("stride", 1.0, dataclasses.replace(options(whisper), kv_budget=0.3))
    assert CompressionSession(stride, whisper, prepared).policy.cross_store == "kv"


def test_compress_around_generate_builds_the_latent_store_from_generates_encoder_output(whisper):
    model = whisper.model
    inputs = dict(whisper.processor.feature_extractor(noise_clip(3.0, seed=6), sampling_rate=16000, return_tensors="pt"))
    decoder = torch.tensor([whisper.prompt_ids])
    plain = model.generate(**inputs, decoder_input_ids=decoder, max_new_tokens=6, do_sample=False)
    # 2 layers: the encoder output at 16 bits is a quarter of the 16-bit cross-attention cache
    with audiokv_cli.compress(model, {**inputs, "decoder_input_ids": decoder}, processor=whisper.processor,
                              method="audiokv", kv_budget=0.3, head_scores=options(whisper).head_scores) as kv:
        tokens = model.generate(**inputs, decoder_input_ids=decoder, **kv.generate_kwargs, max_new_tokens=6,
                                do_sample=False)
    assert kv.session.policy.cross_store == "latent" and kv.session.policy.kv_bits == 16
    assert tokens.tolist() == plain.tolist()
    full16 = whisper.frames * whisper.geometry.kv_bytes_per_token(torch.float16)
    assert kv.session.kept_bytes() == byte_budget.latent_cost(1500, whisper.geometry.hidden_size, 16, False)
    assert math.isclose(kv.session.kept_bytes() / full16, 1 / (2 * whisper.geometry.num_layers), rel_tol=1e-3)


def test_latent_store_is_refused_where_it_cannot_work(random_adapter, whisper):
    prepared = random_adapter.prepare(noise_clip(2.0))
    latent = build_policy("snapkv", 0.5, MethodOptions(window=4, cross_store="latent"))
    with pytest.raises(AudiokvError, match="--cross-store latent needs an encoder-decoder"):
        CompressionSession(latent, random_adapter, prepared)
    values = build_policy("stride", 0.5, MethodOptions(cross_store="latent", merge="values"))
    with pytest.raises(AudiokvError, match="'mean' only"):
        CompressionSession(values, whisper, whisper.prepare(noise_clip(2.0)))
    with pytest.raises(AudiokvError, match="--cross-store must be one of"):
        build_policy("stride", 0.5, MethodOptions(cross_store="everywhere"))


def test_a_long_recording_under_a_budget_reports_the_store_its_windows_ran(whisper):
    full16 = whisper.frames * whisper.geometry.kv_bytes_per_token(torch.float16)
    result = audiokv_cli.transcribe(noise_clip(40.0, seed=8), model=whisper, method="audiokv", kv_budget=0.1,
                                    head_scores=options(whisper).head_scores, max_new_tokens=8)
    assert result.windows >= 2 and result.cross_store == "latent"
    # 2 layers: 16-bit frames are 1/4 of the cache, 8-bit ones 0.133: at 0.1, three quarters of the frames at 8 bits
    assert result.kv_bits == 8 and result.merge == "mean" and 0.5 <= result.retention < 1.0
    frames = round(result.retention * 1500)
    assert result.kv_bytes_kept_max == byte_budget.latent_cost(frames, whisper.geometry.hidden_size, 8, True)
    assert result.kv_bytes_kept_max <= 0.1 * full16


def test_a_budget_that_merges_past_the_cliff_warns_in_one_line(tmp_path):
    import warnings

    full = byte_budget.full_bytes_16bit(1500, 6, 8, 64)
    policy = dataclasses.replace(build_policy("audiokv", 1.0, options_for_whisper_base()), cross_store="latent")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        byte_budget.resolve_latent(dataclasses.replace(policy, kv_budget=1 / 128), frames=1500, dim=512, full_16bit=full)
        assert not caught  # 3:1, measured to hold
        byte_budget.resolve_latent(dataclasses.replace(policy, kv_budget=0.002), frames=1500, dim=512, full_16bit=full)
    assert [w.category for w in caught] == [byte_budget.CoarseMergeWarning]
    assert "merges the encoder frames" in str(caught[0].message) and "\n" not in str(caught[0].message)
