"""The Voxtral adapter on a tiny random model: Mistral-format prompts, 30 s chunks, compressed decoding."""

import pytest

from audiokv_cli.audio import AudioError
from audiokv_cli.models.registry import load_adapter
from audiokv_cli.models.voxtral import VoxtralAdapter
from audiokv_cli.testing_families import build_tiny_voxtral
from tests import adapter_checks as checks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_voxtral(tmp_path_factory.mktemp("tiny-voxtral"))


@pytest.fixture(scope="module")
def adapter(model_dir):
    return load_adapter(str(model_dir), device="cpu", dtype="float32")


def test_registry_finds_the_family(model_dir, adapter):
    checks.check_registry(model_dir, VoxtralAdapter)
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


def test_retention_one_equals_generate(adapter):
    checks.check_lossless_equals_generate(adapter, checks.noise_clip(3.0, seed=1))


def test_compressed_logits_equal_the_masked_dense_model(adapter):
    checks.check_masked_dense(adapter, checks.noise_clip(3.0, seed=2))


def test_every_method_runs(adapter):
    checks.check_every_method_runs(adapter, checks.noise_clip(2.0, seed=3))


def test_positions_after_eviction(adapter):
    checks.check_decode_positions(adapter, checks.noise_clip(2.0, seed=4))


def test_profile_runs_and_matches(adapter, tmp_path):
    checks.check_profile(adapter, tmp_path)
