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


class FamilyModels:
    """Each model family's random test model, built once per session by the builder its adapter class names
    (`random_model`, "module:function") and loaded once: the family suite and the per-family files share them."""

    def __init__(self, tmp_path_factory):
        self.tmp_path_factory = tmp_path_factory
        self.directories: dict[type, object] = {}
        self.adapters: dict[type, object] = {}

    def directory(self, adapter_class):
        import importlib

        import transformers

        required = getattr(adapter_class, "model_class", "")
        if required and not hasattr(transformers, required):
            pytest.skip(f"{required} is not in transformers {transformers.__version__}")
        if adapter_class not in self.directories:
            module, function = adapter_class.random_model.split(":")
            build = getattr(importlib.import_module(module), function)
            self.directories[adapter_class] = build(self.tmp_path_factory.mktemp(function.removeprefix("build_")))
        return self.directories[adapter_class]

    def adapter(self, adapter_class):
        if adapter_class not in self.adapters:
            from audiokv_cli.models import load_adapter

            loaded = load_adapter(str(self.directory(adapter_class)), device="cpu", dtype="float32")
            assert type(loaded) is adapter_class
            self.adapters[adapter_class] = loaded
        return self.adapters[adapter_class]


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    return FamilyModels(tmp_path_factory)


@pytest.fixture(scope="session")
def random_model_dir(family_models):
    from audiokv_cli.models.families.qwen2_audio import Qwen2AudioAdapter

    return family_models.directory(Qwen2AudioAdapter)


@pytest.fixture(scope="session")
def random_adapter(family_models):
    from audiokv_cli.models.families.qwen2_audio import Qwen2AudioAdapter

    return family_models.adapter(Qwen2AudioAdapter)


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
