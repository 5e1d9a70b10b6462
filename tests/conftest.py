"""Shared fixtures: tiny random models built from the real config classes, and small audio files."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import soundfile
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from audiokv_cli.testing import build_tiny_qwen2_audio

    return build_tiny_qwen2_audio(tmp_path_factory.mktemp("tiny-qwen2-audio"))


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model_dir):
    from audiokv_cli.models import load_adapter

    return load_adapter(str(tiny_model_dir), device="cpu", dtype="float32")


def write_tone(path, seconds=2.0, rate=16000, amplitude=0.3, channels=1):
    """A chirp with a little noise: non-silent, deterministic, cheap."""
    t = np.arange(int(seconds * rate)) / rate
    wave = amplitude * np.sin(2 * np.pi * (200 + 300 * t) * t)
    wave += 0.01 * np.random.default_rng(0).standard_normal(t.shape)
    data = np.stack([wave] * channels, axis=1) if channels > 1 else wave
    soundfile.write(str(path), data.astype(np.float32), rate)
    return path


@pytest.fixture
def tone_wav(tmp_path):
    return write_tone(tmp_path / "tone.wav")


def speechlike(seconds: float, seed: int = 0, rate: int = 16000) -> np.ndarray:
    """Noise bursts with pauses: something for every long-form window, and silences to cut at."""
    rng = np.random.default_rng(seed)
    samples = (rng.standard_normal(int(rate * seconds)) * 0.1).astype(np.float32)
    envelope = (np.sin(np.arange(samples.shape[0]) / rate * 2 * np.pi * 0.3) > -0.3).astype(np.float32)
    return samples * envelope
