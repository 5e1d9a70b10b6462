"""The Granite Speech adapter on a tiny random model: Granite chat prompt, Q-Former audio spans, features computed
without torchaudio (the checks every family passes: test_families.py)."""

import json
import math

import numpy as np
import pytest

from audiokv_cli.io.audio import AudioError
from audiokv_cli.errors import AudiokvError
from audiokv_cli.models.families import granite_speech
from audiokv_cli.models.families.granite_speech import (
    GRANITE_ASR_INSTRUCTION,
    GRANITE_SYSTEM_PROMPT,
    GraniteSpeechAdapter,
    GraniteSpeechAudioProcessor,
    GraniteSpeechFeatureSettings,
)
from audiokv_cli.models.registry import MODEL_ALIASES, load_adapter
from tests import adapter_checks as checks


@pytest.fixture(scope="module")
def model_dir(family_models):
    return family_models.directory(GraniteSpeechAdapter)


@pytest.fixture(scope="module")
def adapter(family_models):
    return family_models.adapter(GraniteSpeechAdapter)


def expected_audio_tokens(samples: int) -> int:
    """10 ms mel frames (one more than whole hops), two per encoder frame, 3 tokens per started 15-frame window."""
    encoder_frames = (samples // 160 + 1) // 2
    return math.ceil(encoder_frames / 15) * 3


def reference_features(audio: np.ndarray) -> np.ndarray:
    """The released recipe in float64 numpy, written out: centred frames (reflect padding), a periodic Hann window of
    400 centred in 512, |rFFT|^2, 80 HTK triangles from 0 to 8 kHz, log10 floored at the maximum minus 8, /4 + 1,
    pairs of frames stacked."""
    n_fft, window_length, hop, mels, rate = 512, 400, 160, 80, 16000
    padded = np.pad(audio.astype(np.float64), n_fft // 2, mode="reflect")
    frames = 1 + len(audio) // hop
    window = np.zeros(n_fft)
    offset = (n_fft - window_length) // 2
    window[offset : offset + window_length] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(window_length) / window_length)
    index = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    power = np.abs(np.fft.rfft(padded[index] * window, axis=-1)) ** 2

    def to_mel(hz):
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    corners = 700.0 * (10 ** (np.linspace(0.0, to_mel(rate / 2), mels + 2) / 2595.0) - 1.0)
    bins = np.linspace(0, rate // 2, n_fft // 2 + 1)[:, None]
    rising = (bins - corners[None, :-2]) / (corners[1:-1] - corners[:-2])
    falling = (corners[None, 2:] - bins) / (corners[2:] - corners[1:-1])
    log_mel = np.log10(np.maximum(power @ np.maximum(0.0, np.minimum(rising, falling)), 1e-10))
    log_mel = np.maximum(log_mel, log_mel.max() - 8.0) / 4 + 1
    return log_mel[: frames // 2 * 2].reshape(-1, 2 * mels)


def test_geometry_and_limits(adapter):
    assert adapter.geometry.num_layers == 2 and adapter.geometry.group_size == 2
    assert adapter.geometry.head_dim == 16
    # torchaudio is not installed for the tests: the processor is audiokv's own.
    assert isinstance(adapter.processor, GraniteSpeechAudioProcessor)
    assert adapter.processor.tokenizer.convert_tokens_to_ids("<|end_of_text|>") in adapter.eos_token_ids
    assert {MODEL_ALIASES[name].target for name in ("granite-speech-3.3-2b", "granite-speech-3.3-8b")} == {
        "ibm-granite/granite-speech-3.3-2b", "ibm-granite/granite-speech-3.3-8b"
    }


@pytest.mark.parametrize("seconds, tokens", [(2.0, 21), (12.0, 120), (30.0, 300)])
def test_transcription_prompt_and_exact_audio_span(adapter, seconds, tokens):
    """The model card's chat turns; the one `<|audio|>` becomes exactly the projector's output count."""
    clip = checks.noise_clip(seconds)
    assert expected_audio_tokens(len(clip)) == tokens
    prepared = adapter.prepare(clip)
    assert prepared.prompt == (
        f"<|start_of_role|>system<|end_of_role|>{GRANITE_SYSTEM_PROMPT}<|end_of_text|>\n"
        f"<|start_of_role|>user<|end_of_role|><|audio|>{GRANITE_ASR_INSTRUCTION}<|end_of_text|>\n"
        "<|start_of_role|>assistant<|end_of_role|>"
    )
    head = prepared.prompt.split("<|audio|>")[0]
    start = len(adapter.processor.tokenizer(head)["input_ids"])
    assert prepared.audio_spans == [(start, start + tokens)]
    tail = adapter.processor.tokenizer.decode(prepared.input_ids[0, start + tokens :], skip_special_tokens=False)
    assert tail == prepared.prompt.split("<|audio|>")[1]
    assert prepared.inputs["input_features"].shape == (1, (len(clip) // 160 + 1) // 2, 160)
    assert prepared.inputs["input_features_mask"].tolist() == [[True] * tokens]
    assert prepared.audio_seconds == pytest.approx(seconds)


def test_token_counts_of_the_released_processor_tests():
    """transformers' processor tests on ibm-granite/granite-speech-3.3-8b: 269,920 samples give 844 frames of 160
    values and 171 audio tokens, 142,100 samples give 90 tokens."""
    features = granite_speech.GraniteSpeechFeatures(GraniteSpeechFeatureSettings())
    assert [features.audio_tokens(n) for n in (269_920, 142_100)] == [171, 90]
    out = features([np.zeros(142_100, np.float32), np.zeros(269_920, np.float32)])
    assert tuple(out["input_features"].shape) == (2, 844, 160)
    assert out["input_features_mask"].sum(-1).tolist() == [90, 171]


def test_free_form_prompt(adapter):
    prepared = adapter.prepare(checks.noise_clip(1.0), prompt="What is the mood?")
    assert "<|start_of_role|>user<|end_of_role|><|audio|>What is the mood?<|end_of_text|>" in prepared.prompt
    assert prepared.audio_tokens == expected_audio_tokens(16000)


@pytest.mark.parametrize("seconds", [0.5, 3.0, 7.3])
def test_features_match_a_float64_reference(adapter, seconds):
    clip = checks.noise_clip(seconds, seed=5)
    features = adapter.processor.features([clip])["input_features"][0].numpy()
    reference = reference_features(clip)
    assert features.shape == reference.shape
    assert np.abs(features - reference).max() < 1e-4


def test_batch_pads_like_the_stock_extractor(adapter):
    """Clips of two lengths are zero-padded to the longer; the mask marks each clip's own audio tokens."""
    short, long = checks.noise_clip(1.0, seed=1), checks.noise_clip(2.5, seed=2)
    batch = adapter.processor.features([short, long])
    padded = np.concatenate([short, np.zeros(len(long) - len(short), np.float32)])
    alone = adapter.processor.features([padded])["input_features"][0]
    assert (batch["input_features"][0] - alone).abs().max() == 0
    assert batch["input_features_mask"].sum(-1).tolist() == [expected_audio_tokens(len(c)) for c in (short, long)]


def test_settings_come_from_the_preprocessor_config(model_dir):
    values = json.loads((model_dir / "preprocessor_config.json").read_text())
    assert GraniteSpeechFeatureSettings.from_config(values) == GraniteSpeechFeatureSettings()
    assert GraniteSpeechFeatureSettings.from_config({**values, "projector_window_size": 10}).projector_window_size == 10
    # The stock extractor rebuilds melspec_kwargs from its arguments; a saved one that disagrees is refused.
    with pytest.raises(AudiokvError, match="melspec_kwargs n_mels=128"):
        GraniteSpeechFeatureSettings.from_config({**values, "melspec_kwargs": {"n_mels": 128}})


def test_a_speech_lora_without_a_usable_peft_is_refused(model_dir, tmp_path, monkeypatch):
    for path in model_dir.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "has_lora_adapter": True}))
    monkeypatch.setattr(granite_speech, "speech_lora_problem", lambda: "needs `pip install 'peft>=0.22.0'`")
    with pytest.raises(AudiokvError, match="speech LoRA needs `pip install"):
        load_adapter(str(tmp_path), device="cpu", dtype="float32")


def test_speech_lora_problem_names_the_peft_to_install(monkeypatch):
    import importlib.metadata

    from transformers.integrations.peft import MIN_PEFT_VERSION

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.1")
    assert f"needs peft >= {MIN_PEFT_VERSION}" in granite_speech.speech_lora_problem()

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert granite_speech.speech_lora_problem() == f"needs `pip install 'peft>={MIN_PEFT_VERSION}'`"


def test_audio_over_the_limit_is_refused(adapter):
    with pytest.raises(AudioError, match="limit of 600 s"):
        adapter.prepare(np.zeros(601 * 16000, np.float32))


def test_audio_shorter_than_the_stft_padding_is_refused(adapter):
    assert adapter.min_samples == 257
    with pytest.raises(AudioError, match="256 samples of audio are fewer than Granite Speech's minimum of 257"):
        adapter.prepare(np.zeros(256, np.float32))
    assert adapter.prepare(np.zeros(257, np.float32)).audio_tokens == 3
