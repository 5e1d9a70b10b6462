"""The Voxtral adapter on a tiny random model: Mistral-format prompts, 30 s chunks (the checks every
family passes: test_families.py)."""

import pytest

from audiokv_cli.io.audio import AudioError
from audiokv_cli.models.families.voxtral import VoxtralAdapter
from tests import adapter_checks as checks


@pytest.fixture(scope="module")
def adapter(family_models):
    return family_models.adapter(VoxtralAdapter)


def test_geometry_and_limits(adapter):
    assert adapter.geometry.num_layers == 2 and adapter.geometry.group_size == 2
    assert adapter.tokens_per_chunk == 375
    assert adapter.processor.token_id("</s>") in adapter.eos_token_ids


@pytest.mark.parametrize("seconds, chunks", [(2.0, 1), (30.0, 1), (45.0, 2)])
def test_transcription_prompt_and_exact_audio_span(adapter, seconds, chunks):
    """Every started 30 s chunk is 375 audio tokens; the prompt around them is Mistral's transcription request."""
    prepared = adapter.prepare(checks.noise_clip(seconds))
    assert prepared.inputs["input_features"].shape[0] == chunks
    token = adapter.processor.token_id
    ids = prepared.input_ids[0].tolist()
    assert ids[:3] == [token("<s>"), token("[INST]"), token("[BEGIN_AUDIO]")]
    assert prepared.audio_spans == [(3, 3 + 375 * chunks)]
    tail = ids[3 + 375 * chunks :]
    assert tail[0] == token("[/INST]") and tail[-1] == token("[TRANSCRIBE]")
    assert adapter.processor.tokenizer.decode(tail[1:-1]) == "lang:en"
    assert prepared.prompt == "<s>[INST][BEGIN_AUDIO][AUDIO][/INST]lang:en[TRANSCRIBE]"
    assert prepared.audio_seconds == pytest.approx(seconds)


def test_free_form_prompt(adapter):
    prepared = adapter.prepare(checks.noise_clip(1.0), prompt="What is the mood?")
    assert prepared.prompt == "<s>[INST][BEGIN_AUDIO][AUDIO]What is the mood?[/INST]"
    assert prepared.audio_tokens == 375


def test_audio_over_the_limit_is_refused(adapter, monkeypatch):
    monkeypatch.setattr(adapter, "max_audio_seconds", 60.0)
    with pytest.raises(AudioError, match="limit of 60 s"):
        adapter.prepare(checks.noise_clip(61.0))
