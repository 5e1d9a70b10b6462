"""The VibeVoice-ASR adapter on a tiny random model: 24 kHz audio, prompt and audio spans across tokenizer chunks,
deterministic audio embeddings, JSON output (the checks every family passes: test_families.py)."""

import json

import pytest
import torch
import transformers

from audiokv_cli.io.audio import AudioError
from audiokv_cli.models.families.vibevoice_asr import VibeVoiceAsrAdapter
from tests import adapter_checks as checks

if not hasattr(transformers, "VibeVoiceAsrForConditionalGeneration"):
    pytest.skip(f"VibeVoice-ASR is not in transformers {transformers.__version__}", allow_module_level=True)

INSTRUCTION = "please transcribe it with these keys: Start time, End time, Speaker ID, Content"


@pytest.fixture(scope="module")
def model_dir(family_models):
    return family_models.directory(VibeVoiceAsrAdapter)


@pytest.fixture(scope="module")
def adapter(family_models):
    return family_models.adapter(VibeVoiceAsrAdapter)


def test_geometry_and_limits(adapter):
    assert adapter.geometry.num_layers == 2 and adapter.geometry.group_size == 2
    assert VibeVoiceAsrAdapter.max_audio_seconds == 3600.0
    assert adapter.processor.feature_extractor.sampling_rate == 24000


def test_audio_embeddings_are_deterministic(model_dir, adapter):
    """The checkpoint's latent noise (vae_std) is switched off on load: a clip encodes the same every time."""
    saved = json.loads((model_dir / "config.json").read_text())
    assert saved["acoustic_tokenizer_encoder_config"]["vae_std"] == 0.625
    assert adapter.model.config.acoustic_tokenizer_encoder_config.vae_std == 0.0
    prepared = adapter.prepare(checks.noise_clip(2.0))
    audio = {key: prepared.inputs[key] for key in ("input_values", "padding_mask")}
    with torch.no_grad():
        first, second = (adapter.model.model.get_audio_features(**audio).pooler_output for _ in range(2))
    assert torch.equal(first, second)


@pytest.mark.parametrize("seconds, tokens", [(2.0, 15), (5.3, 40), (9.0, 68)])
def test_prompt_and_exact_audio_span(adapter, seconds, tokens):
    """133.3 ms per token at 24 kHz, the clip padded to whole tokens; 5.3 s and 9 s cross the tiny model's 4 s
    tokenizer chunks."""
    prepared = adapter.prepare(checks.noise_clip(seconds))
    assert prepared.inputs["input_values"].shape[-1] == 3200 * tokens
    tokenizer = adapter.processor.tokenizer
    ids = prepared.input_ids[0].tolist()
    (start, end), = prepared.audio_spans
    assert end - start == tokens == prepared.audio_tokens
    assert ids[start - 1] == tokenizer.convert_tokens_to_ids("<|object_ref_start|>")
    assert ids[end] == tokenizer.convert_tokens_to_ids("<|object_ref_end|>")
    assert tokenizer.decode(ids[:start - 1]) == (
        "<|im_start|>system\nYou are a helpful assistant that transcribes audio input into text output in JSON format."
        "<|im_end|>\n<|im_start|>user\n"
    )
    assert tokenizer.decode(ids[end + 1 :]) == f"\nThis is a {seconds:.2f} seconds audio, {INSTRUCTION}<|im_end|>\n"
    assert "<|AUDIO_DURATION|>" in prepared.prompt
    assert prepared.audio_seconds == pytest.approx(seconds)


def test_prompt_is_extra_info_before_the_instruction(adapter):
    prepared = adapter.prepare(checks.noise_clip(1.0), prompt="About VibeVoice")
    assert "seconds audio, with extra info: About VibeVoice\n\nPlease transcribe it with these keys" in prepared.prompt


def test_decode_keeps_the_spoken_text(adapter):
    tokenizer = adapter.processor.tokenizer
    segments = [
        {"Start": 0, "End": 1.5, "Speaker": 0, "Content": "hello there"},
        {"Start": 1.5, "End": 3.0, "Speaker": 1, "Content": "good bye"},
    ]
    text = "assistant\n" + json.dumps(segments)
    assert adapter.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == "hello there good bye"
    # Cut short by the token limit: the complete segments are kept (transformers 5.10.4's parser cannot read a cut
    # list; the text comes back as it is, never an error).
    cut = tokenizer(text[:-20], add_special_tokens=False)["input_ids"]
    assert adapter.decode(cut) in ("hello there", text[:-20])


def test_audio_over_the_limit_is_refused(adapter, monkeypatch):
    monkeypatch.setattr(adapter, "max_audio_seconds", 60.0)
    with pytest.raises(AudioError, match="limit of 60 s"):
        adapter.prepare(checks.noise_clip(61.0))
