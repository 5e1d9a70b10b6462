"""The checks every model family passes on its random test model, run over the registry (`registry.ADAPTERS`): a
family added there is tested here without a new file. What only one family knows (prompt wording, exact audio
spans, limits, rotary positions) stays in its own file, tests/test_<family>.py."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from audiokv_cli.compression.methods import build_policy
from audiokv_cli.evaluation.cell_batch import run_cells_batched
from audiokv_cli.runtime.inference import run_clip
from audiokv_cli.models.registry import ADAPTERS
from tests import adapter_checks as checks


def family_id(adapter_class) -> str:
    return adapter_class.__module__.rsplit(".", 1)[-1]


CROSS_ATTENTION = [cls for cls in ADAPTERS if cls.compressed_attention == "cross"]
MROPE = [cls for cls in ADAPTERS if family_id(cls) in ("qwen2_5_omni", "qwen3_omni_moe")]


@pytest.fixture(scope="module", params=ADAPTERS, ids=family_id)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def adapter(family, family_models):
    return family_models.adapter(family)


def test_every_registered_family_names_its_test_model():
    for cls in ADAPTERS:
        assert ":" in getattr(cls, "random_model", ""), f"{cls.__name__} names no random test model builder"
    assert len({family_id(cls) for cls in ADAPTERS}) == len(ADAPTERS)
    assert len(CROSS_ATTENTION) == 2 and len(MROPE) == 2


def test_registry_finds_the_family(family, adapter, family_models):
    checks.check_registry(family_models.directory(family), family)


def test_retention_one_equals_generate(adapter):
    checks.check_lossless_equals_generate(adapter, checks.noise_clip(3.0, seed=1))


def test_compressed_logits_equal_the_masked_dense_model(adapter):
    checks.check_masked_dense(adapter, checks.noise_clip(3.0, seed=2))


def test_every_method_runs(adapter):
    checks.check_every_method_runs(adapter, checks.noise_clip(3.0, seed=3))


def test_positions_after_eviction(adapter):
    checks.check_decode_positions(adapter, checks.noise_clip(3.0, seed=4))


def test_profile_runs_and_matches(family, adapter, tmp_path):
    # The random Whisper's character tokenizer drops spaces: only a one-word transcript lines up with its words.
    transcript = "alpha" if family_id(family) == "whisper" else "alpha bravo charlie"
    checks.check_profile(adapter, tmp_path, transcript)


@pytest.mark.parametrize("family_class", CROSS_ATTENTION, ids=family_id)
def test_batched_cells_decode_like_single_runs(family_class, family_models):
    """`audiokv eval` decodes an encoder-decoder's cells as rows of one batch sharing one copy of the features."""
    adapter = family_models.adapter(family_class)
    audio = checks.noise_clip(5.0, seed=5)
    prepared = adapter.prepare(audio)
    settings = [("full", 1.0), ("snapkv", 0.3), ("audiokv", 0.2), ("h2o", 0.1)]
    policies = [build_policy(method, retention, checks.options(adapter)) for method, retention in settings]
    outcomes, _ = run_cells_batched(adapter, prepared, policies, max_new_tokens=5)
    for policy, outcome in zip(policies, outcomes):
        single = run_clip(adapter, audio, policy, max_new_tokens=5)
        assert outcome.token_ids == single.token_ids, policy.name
        assert outcome.kv_bytes_kept == pytest.approx(single.kv_bytes_kept, rel=0.001), policy.name


@pytest.mark.parametrize("family_class", MROPE, ids=family_id)
def test_full_omni_checkpoint_loads_only_the_thinker(family_class, family_models, tmp_path):
    import importlib

    from audiokv_cli.models.registry import load_adapter

    adapter = family_models.adapter(family_class)
    module, function = family_class.random_model.split(":")
    full = getattr(importlib.import_module(module), function)(tmp_path / "full", full_omni=True)
    loaded = load_adapter(str(full), device="cpu", dtype="float32")
    assert type(loaded) is family_class
    assert "Thinker" in type(loaded.model).__name__
    # Same seed, same thinker weights: a weight left unread would be freshly (differently) initialised.
    expected, got = adapter.model.state_dict(), loaded.model.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("family_class", MROPE, ids=family_id)
def test_mrope_decode_positions_continue_from_the_prompt_offset(family_class, family_models, monkeypatch):
    """A prompt whose M-RoPE positions end ahead of its length (as vision prompts do) shifts every later step,
    also after eviction: the compressed step equals a dense forward given the shifted positions explicitly."""
    from audiokv_cli.runtime.attention import use_attention_handler
    from audiokv_cli.compression.policy import CompressionSession

    adapter = family_models.adapter(family_class)
    prepared = adapter.prepare(checks.noise_clip(2.0))
    length, offset = prepared.prompt_tokens, 7
    original = adapter.model.get_rope_index

    def shifted(*args, **kwargs):
        positions, deltas = original(*args, **kwargs)
        return positions + offset, deltas + offset

    monkeypatch.setattr(adapter.model, "get_rope_index", shifted)
    with torch.no_grad():
        cache = DynamicCache()
        token = adapter.next_token_logits(prepared.inputs, cache).argmax(-1)[:, None]
        step = adapter.next_token_logits({"input_ids": token}, cache)
        inputs = dict(prepared.inputs)
        inputs["input_ids"] = torch.cat([prepared.input_ids, token], dim=-1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        positions = (torch.arange(length + 1) + offset).view(1, 1, -1).expand(3, 1, -1)
        whole = adapter.model(**inputs, position_ids=positions).logits[:, -1]
        # What a step that ignored the offset would compute: the new token right after the prompt's length.
        stale = positions.clone()
        stale[..., -1] = length
        ignoring_offset = adapter.model(**inputs, position_ids=stale).logits[:, -1]
        torch.testing.assert_close(step, whole, atol=1e-5, rtol=0)
        assert not torch.allclose(step, ignoring_offset, atol=1e-4)  # the offset matters: the check is not vacuous
        # Compressed at retention 1.0 the same step must come out (positions from the logical length).
        session = CompressionSession(build_policy("snapkv", 1.0, checks.options(adapter)), adapter, prepared)
        with use_attention_handler(adapter, session):
            adapter.next_token_logits(prepared.inputs, session.cache)
            compressed_step = adapter.next_token_logits({"input_ids": token}, session.cache)
        torch.testing.assert_close(compressed_step, whole, atol=1e-5, rtol=0)
