"""The GLM-ASR adapter on a tiny random model: prompt and audio spans, long audio (the
checks every family passes: test_families.py)."""

import pytest

from audiokv_cli.io.audio import AudioError
from audiokv_cli.models.families.glm_asr import GlmAsrAdapter
from tests import adapter_checks as checks


@pytest.fixture(scope="module")
def adapter(family_models):
    return family_models.adapter(GlmAsrAdapter)


def test_geometry_and_limits(adapter):
    assert adapter.geometry.num_layers == 2 and adapter.geometry.group_size == 2
    assert adapter.max_audio_seconds == 90.0  # the tiny processor's max_audio_len; the released one is 655 s


@pytest.mark.parametrize("seconds, tokens", [(2.0, 25), (6.3, 78), (45.0, 562)])
def test_prompt_and_exact_audio_span(adapter, seconds, tokens):
    prepared = adapter.prepare(checks.noise_clip(seconds))
    ids = prepared.input_ids[0].tolist()
    sound = adapter.processor.tokenizer.convert_tokens_to_ids("<|pad|>")
    start = ids.index(sound)
    # 80 ms per token; over 30 s the processor encodes consecutive 30 s windows, joined into one audio item.
    assert prepared.audio_spans == [(start, start + tokens)] and ids.count(sound) == tokens
    assert prepared.prompt == (
        "<|im_start|>user\n<|begin_of_audio|><|pad|><|end_of_audio|>Please transcribe this audio into text<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert prepared.audio_seconds == pytest.approx(seconds)
    free = adapter.prepare(checks.noise_clip(1.0), prompt="What is the mood?")
    assert "What is the mood?" in free.prompt and "transcribe" not in free.prompt


def test_audio_over_the_limit_is_refused_not_cut(adapter):
    with pytest.raises(AudioError, match="longer than this model's limit of 90 s"):
        adapter.prepare(checks.noise_clip(91.0))
