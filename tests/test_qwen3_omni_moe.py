"""The Qwen3-Omni-MoE thinker adapter on tiny random models: thinker-only loading, prompts, M-RoPE positions,
compressed decoding."""

import pytest
import torch
from transformers import DynamicCache

from audiokv_cli.models.qwen3_omni_moe import ASR_INSTRUCTION_QWEN3_OMNI, Qwen3OmniMoeAdapter, audio_token_count
from audiokv_cli.models.registry import load_adapter
from audiokv_cli.testing_families import build_tiny_qwen3_omni_thinker
from tests import adapter_checks as checks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_qwen3_omni_thinker(tmp_path_factory.mktemp("tiny-qwen3-omni"))


@pytest.fixture(scope="module")
def adapter(model_dir):
    return load_adapter(str(model_dir), device="cpu", dtype="float32")


def test_registry_finds_the_family(model_dir, adapter):
    checks.check_registry(model_dir, Qwen3OmniMoeAdapter)
    assert adapter.geometry.num_layers == 2 and adapter.geometry.group_size == 2
    assert type(adapter.model).__name__ == "Qwen3OmniMoeThinkerForConditionalGeneration"
    assert all(layer.config is adapter.text_config for layer in adapter.decoder_layers())


def test_full_checkpoint_loads_only_the_thinker(adapter, tmp_path):
    full = build_tiny_qwen3_omni_thinker(tmp_path / "full", full_omni=True)
    loaded = load_adapter(str(full), device="cpu", dtype="float32")
    assert isinstance(loaded, Qwen3OmniMoeAdapter)
    # Same seed, same thinker weights: a weight left unread would be freshly (differently) initialised.
    expected, got = adapter.model.state_dict(), loaded.model.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("seconds, tokens", [(2.0, 26), (6.3, 82), (45.0, 585)])
def test_prompt_and_exact_audio_span(adapter, seconds, tokens):
    """13 tokens per second of audio, the last partial second through three stride-2 convolutions; no 30 s cut."""
    prepared = adapter.prepare(checks.noise_clip(seconds))
    assert audio_token_count(int(prepared.inputs["feature_attention_mask"].sum())) == tokens
    ids = prepared.input_ids[0].tolist()
    token = adapter.processor.tokenizer.convert_tokens_to_ids
    start, end = prepared.audio_spans[0]
    assert prepared.audio_spans == [(start, start + tokens)]
    assert ids[start - 1] == token("<|audio_start|>") and ids[end] == token("<|audio_end|>")
    assert ASR_INSTRUCTION_QWEN3_OMNI in prepared.prompt and prepared.prompt.endswith("<|im_start|>assistant\n")
    assert prepared.audio_seconds == pytest.approx(seconds)
    free = adapter.prepare(checks.noise_clip(1.0), prompt="What is the mood?")
    assert "What is the mood?" in free.prompt and ASR_INSTRUCTION_QWEN3_OMNI not in free.prompt


def test_audio_over_the_limit_is_refused(adapter, monkeypatch):
    from audiokv_cli.audio import AudioError

    assert adapter.max_audio_seconds == 1200.0  # not the extractor's 30 s padding window: it never cuts
    monkeypatch.setattr(adapter, "max_audio_seconds", 40.0)
    with pytest.raises(AudioError, match="limit of 40 s"):
        adapter.prepare(checks.noise_clip(41.0))


def test_retention_one_equals_generate(adapter):
    checks.check_lossless_equals_generate(adapter, checks.noise_clip(3.0, seed=1))


def test_compressed_logits_equal_the_masked_dense_model(adapter):
    checks.check_masked_dense(adapter, checks.noise_clip(4.0, seed=2))


def test_every_method_runs(adapter):
    checks.check_every_method_runs(adapter, checks.noise_clip(3.0, seed=3))


def test_positions_after_eviction(adapter):
    checks.check_decode_positions(adapter, checks.noise_clip(3.0, seed=4))


def test_mrope_decode_positions_continue_from_the_prompt_offset(adapter, monkeypatch):
    """A prompt whose M-RoPE positions end ahead of its length (as vision prompts do) shifts every later step,
    also after eviction: the compressed step equals a dense forward given the shifted positions explicitly."""
    from audiokv_cli.attention import use_attention_handler
    from audiokv_cli.compression.methods import build_policy
    from audiokv_cli.compression.policy import CompressionSession

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
        stale = positions.clone()
        stale[..., -1] = length
        ignoring_offset = adapter.model(**inputs, position_ids=stale).logits[:, -1]
        torch.testing.assert_close(step, whole, atol=1e-5, rtol=0)
        assert not torch.allclose(step, ignoring_offset, atol=1e-4)
        # Compressed at retention 1.0 the same step must come out (positions from the logical length).
        session = CompressionSession(build_policy("snapkv", 1.0, checks.options(adapter)), adapter, prepared)
        with use_attention_handler(adapter, session):
            adapter.next_token_logits(prepared.inputs, session.cache)
            compressed_step = adapter.next_token_logits({"input_ids": token}, session.cache)
        torch.testing.assert_close(compressed_step, whole, atol=1e-5, rtol=0)


def test_profile_runs_and_matches(adapter, tmp_path):
    checks.check_profile(adapter, tmp_path)
