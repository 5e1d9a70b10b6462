"""Granite Speech features without torchaudio, checked against the stock `GraniteSpeechFeatureExtractor`.

`GraniteSpeechAudioProcessor` (audiokv_cli/models/families/granite_speech.py) computes Granite Speech's features with torch
alone. The stock extractor needs torchaudio, which has no build for torch 2.13; its `MelSpectrogram` is pure Python,
though, so for this one-off check torchaudio is imported from an unpacked wheel with its C extension stubbed out (the
library is built for another torch and would not load). The test suite never does this.

    pip download --no-deps -d /tmp/ta torchaudio==2.11.1
    python -m zipfile -e /tmp/ta/torchaudio-2.11.1-*.whl /tmp/ta/ext
    python scripts/check_granite_features.py /tmp/ta/ext

Prints, per clip (noise and a sine sweep of 0.5 s to 61 s, and a batch of two lengths), the largest absolute
difference of the features, whether the feature masks and the audio token counts are equal; then the same for the
whole prompt of the tiny test checkpoint: the adapter with the stock `GraniteSpeechProcessor` (taken when torchaudio
imports) against `GraniteSpeechAudioProcessor`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import types

import numpy as np
import torch

SAMPLE_RATE = 16000


def import_torchaudio(wheel_folder: str):
    """torchaudio's Python code from an unpacked wheel, its compiled extension replaced by a stub."""
    def exported(name: str):
        if name.startswith("__"):  # module attributes such as __file__, which inspect looks up, stay missing
            raise AttributeError(name)
        return lambda function: function  # the decorators it exports become no-ops

    stub = types.ModuleType("torchaudio._extension")
    stub._IS_TORCHAUDIO_EXT_AVAILABLE = False
    stub.__getattr__ = exported
    sys.modules["torchaudio._extension"] = stub
    sys.path.insert(0, wheel_folder)
    import torchaudio

    return torchaudio


def noise(seconds: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE)) * 0.1).astype(np.float32)


def sweep(seconds: float) -> np.ndarray:
    """An exponential sine sweep from 50 Hz to 7.5 kHz."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    low, high = 50.0, 7500.0
    rate = np.log(high / low) / seconds
    return (0.5 * np.sin(2 * np.pi * low * (np.exp(rate * t) - 1) / rate)).astype(np.float32)


def compare(name: str, stock: dict, ours: dict) -> bool:
    difference = float((stock["input_features"] - ours["input_features"]).abs().max())
    same_shape = stock["input_features"].shape == ours["input_features"].shape
    masks = bool(torch.equal(stock["input_features_mask"], ours["input_features_mask"]))
    tokens = list(stock["audio_embed_sizes"]) == list(ours["audio_embed_sizes"])
    shape = "x".join(str(n) for n in ours["input_features"].shape)
    print(
        f"{name:<32} features {shape:<14} max |diff| {difference:.2e}  masks equal {masks}  "
        f"audio tokens {list(ours['audio_embed_sizes'])} equal {tokens}"
    )
    return same_shape and masks and tokens and difference < 1e-4


def check_prompts(clip: np.ndarray) -> bool:
    """The adapter's prompt through the stock processor against GraniteSpeechAudioProcessor, on the tiny checkpoint."""
    from transformers import GraniteSpeechProcessor

    from audiokv_cli.models.families.granite_speech import GraniteSpeechAudioProcessor
    from audiokv_cli.models.registry import load_adapter
    from audiokv_cli.testing.families import build_random_granite_speech

    with tempfile.TemporaryDirectory() as folder:
        build_random_granite_speech(folder)
        adapter = load_adapter(folder, device="cpu", dtype="float32")
        assert isinstance(adapter.processor, GraniteSpeechProcessor), type(adapter.processor)
        stock = adapter.prepare(clip).inputs
        ours = GraniteSpeechAudioProcessor.from_pretrained(folder)(
            text=adapter.prompt_text(None), audio=[clip], return_tensors="pt"
        )
    ids = torch.equal(stock["input_ids"], ours["input_ids"]) and torch.equal(
        stock["attention_mask"], ours["attention_mask"]
    )
    difference = float((stock["input_features"] - ours["input_features"]).abs().max())
    masks = bool(torch.equal(stock["input_features_mask"], ours["input_features_mask"]))
    audio_tokens = int((ours["input_ids"] == adapter.audio_token_id).sum())
    print(
        f"{'prompt, tiny checkpoint':<32} input_ids equal {ids} ({ours['input_ids'].shape[1]} tokens, {audio_tokens} "
        f"audio)  max |diff| {difference:.2e}  masks equal {masks}"
    )
    return ids and masks and difference < 1e-4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel_folder", help="the unpacked torchaudio wheel (the folder holding torchaudio/)")
    args = parser.parse_args()
    torchaudio = import_torchaudio(args.wheel_folder)

    from transformers import GraniteSpeechFeatureExtractor

    from audiokv_cli.models.families.granite_speech import GraniteSpeechFeatures, GraniteSpeechFeatureSettings
    from audiokv_cli.testing.families import GRANITE_SPEECH_PREPROCESSOR

    # Both built from the released preprocessor_config.json, as from_pretrained builds the stock one.
    stock = GraniteSpeechFeatureExtractor.from_dict(dict(GRANITE_SPEECH_PREPROCESSOR))
    ours = GraniteSpeechFeatures(GraniteSpeechFeatureSettings.from_config(GRANITE_SPEECH_PREPROCESSOR))
    assert stock.melspec_kwargs == ours.settings.melspec_kwargs, (stock.melspec_kwargs, ours.settings)
    print(f"torchaudio {torchaudio.__version__} (Python only), torch {torch.__version__}: {stock.melspec_kwargs}")

    cases = []
    for seconds in (0.5, 3.0, 17.3, 30.0, 61.0):
        cases.append((f"noise {seconds:g} s", [noise(seconds, seed=int(seconds * 10))]))
        cases.append((f"sweep {seconds:g} s", [sweep(seconds)]))
    cases.append(("batch: noise 3 s + sweep 17.3 s", [noise(3.0, seed=7), sweep(17.3)]))
    passed = all([compare(name, stock(clips), ours(clips)) for name, clips in cases])

    # torchaudio computes its mel filter bank in float32, transformers' mel_filter_bank in float64: that is the whole
    # difference, as the same features with torchaudio's filter bank show.
    clip = torch.from_numpy(sweep(30.0))[None]
    filters = ours.mel_filters
    ours.mel_filters = stock.mel_filters.mel_scale.fb
    exact = float((ours.input_features(clip) - stock._extract_mel_spectrograms(clip)).abs().max())
    ours.mel_filters = filters
    relative = float((stock.mel_filters.mel_scale.fb - filters).abs().max() / filters.abs().max())
    print(
        f"{'sweep 30 s, torchaudio fb':<32} max |diff| {exact:.2e}  (filter banks differ by {relative:.1e} of their "
        "peak: torchaudio float32, mel_filter_bank float64)"
    )
    passed = check_prompts(noise(3.0, seed=8)) and passed
    print("all equal within 1e-4" if passed else "MISMATCH")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
