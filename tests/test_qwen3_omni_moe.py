"""The Qwen3-Omni-MoE thinker adapter on tiny random models: prompts and limits (thinker-only
loading, M-RoPE positions and the checks every family passes: test_families.py)."""

import pytest

from audiokv_cli.models.families.qwen3_omni_moe import ASR_INSTRUCTION_QWEN3_OMNI, Qwen3OmniMoeAdapter, audio_token_count
from tests import adapter_checks as checks


@pytest.fixture(scope="module")
def adapter(family_models):
    return family_models.adapter(Qwen3OmniMoeAdapter)


def test_geometry_and_limits(adapter):
    assert adapter.geometry.num_layers == 2 and adapter.geometry.group_size == 2
    assert type(adapter.model).__name__ == "Qwen3OmniMoeThinkerForConditionalGeneration"
    assert all(layer.config is adapter.text_config for layer in adapter.decoder_layers())


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
    from audiokv_cli.io.audio import AudioError

    assert adapter.max_audio_seconds == 1200.0  # not the extractor's 30 s padding window: it never cuts
    monkeypatch.setattr(adapter, "max_audio_seconds", 40.0)
    with pytest.raises(AudioError, match="limit of 40 s"):
        adapter.prepare(checks.noise_clip(41.0))
