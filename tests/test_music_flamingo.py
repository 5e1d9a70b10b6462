"""The Music Flamingo adapter on a tiny random model: prompt and audio spans, long audio
(the checks every family passes: test_families.py)."""

import pytest

from audiokv_cli.io.audio import AudioError
from audiokv_cli.models.families.music_flamingo import MusicFlamingoAdapter
from tests import adapter_checks as checks


@pytest.fixture(scope="module")
def adapter(family_models):
    return family_models.adapter(MusicFlamingoAdapter)


def test_geometry_and_limits(adapter):
    assert adapter.geometry.num_layers == 2 and adapter.geometry.group_size == 2
    assert adapter.max_audio_seconds == 90.0  # the tiny processor's max_audio_len; the released one is 1200 s


@pytest.mark.parametrize("seconds, tokens", [(2.0, 50), (6.3, 157), (45.0, 1125)])
def test_prompt_and_exact_audio_span(adapter, seconds, tokens):
    prepared = adapter.prepare(checks.noise_clip(seconds))
    ids = prepared.input_ids[0].tolist()
    token = adapter.processor.tokenizer.convert_tokens_to_ids
    start = ids.index(token("<sound>"))
    # Over 30 s the processor encodes consecutive 30 s windows and joins their tokens into one audio item.
    assert prepared.audio_spans == [(start, start + tokens)] and ids.count(token("<sound>")) == tokens
    assert ids[start - 1] == token("<|sound_bos|>") and ids[start + tokens] == token("<|sound_eos|>")
    assert prepared.prompt == "<|im_start|>user\nTranscribe the input speech.<sound><|im_end|>\n<|im_start|>assistant\n"
    assert prepared.audio_seconds == pytest.approx(seconds)
    free = adapter.prepare(checks.noise_clip(1.0), prompt="What is the mood?")
    assert "What is the mood?" in free.prompt and "Transcribe" not in free.prompt


def test_audio_over_the_limit_is_refused_not_cut(adapter):
    with pytest.raises(AudioError, match="longer than this model's limit of 90 s"):
        adapter.prepare(checks.noise_clip(91.0))
