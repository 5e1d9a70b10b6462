"""Fuzzing the readers of user files: whatever the bytes, a valid result or an AudiokvError, never another exception.

500 examples per property by default (the `ci` profile); `HYPOTHESIS_PROFILE=deep` runs 10,000 (docs/reliability.md).
"""

from __future__ import annotations

import atexit
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import soundfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audiokv_cli.io.audio import load_audio
from audiokv_cli.errors import AudiokvError
from audiokv_cli.evaluation.datasets import read_manifest as read_eval_manifest
from audiokv_cli.profiling.alignment import read_manifest as read_profiling_manifest
from audiokv_cli.profiling.profile_file import HeadProfile, load_profile, save_profile

settings.register_profile("ci", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(parent=settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci")),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

WORK = Path(tempfile.mkdtemp(prefix="audiokv-fuzz-"))
atexit.register(shutil.rmtree, WORK, ignore_errors=True)


def _valid_profile_bytes() -> bytes:
    from tests.test_profile_file import make_profile

    return save_profile(make_profile(), WORK / "seed-profile").read_bytes()


def _valid_audio_bytes() -> dict[str, bytes]:
    wave = (0.3 * np.sin(np.arange(1600) / 5)).astype(np.float32)
    out = {}
    for fmt in ("WAV", "FLAC", "OGG"):
        buffer = io.BytesIO()
        soundfile.write(buffer, wave, 16000, format=fmt)
        out[fmt] = buffer.getvalue()
    return out


def mutated(seeds: list[bytes]):
    """Valid files with bytes overwritten, cut short or spliced in: the inputs that get past the first check."""

    @st.composite
    def build(draw):
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(0, 6))):
            position = draw(st.integers(0, max(len(data) - 1, 0)))
            action = draw(st.sampled_from(["flip", "cut", "insert", "splat"]))
            if action == "flip" and data:
                data[position] ^= 1 << draw(st.integers(0, 7))
            elif action == "cut":
                del data[position:]
            elif action == "insert":
                data[position:position] = draw(st.binary(max_size=16))
            elif action == "splat" and data:
                value = draw(st.sampled_from([b"\x00", b"\xff", b"\x7f", b"9"]))
                data[position : position + 8] = value * 8
        return bytes(data)

    return build()


def _write(data: bytes, suffix: str) -> Path:
    handle, name = tempfile.mkstemp(dir=WORK, suffix=suffix)
    with os.fdopen(handle, "wb") as file:
        file.write(data)
    return Path(name)


PROFILE_SEEDS = [_valid_profile_bytes()]
AUDIO_SEEDS = list(_valid_audio_bytes().values())


@FUZZ
@given(st.one_of(st.binary(max_size=512), mutated(PROFILE_SEEDS)))
def test_profile_reader(data):
    path = _write(data, ".safetensors")
    try:
        assert isinstance(load_profile(path), HeadProfile)
    except AudiokvError as error:
        assert "\n" not in str(error)
    finally:
        path.unlink()


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_audio_field = st.sampled_from(["clip.wav", str(WORK / "clip.wav"), "absent.wav", "", "../clip.wav"]) | _json_values
_records = st.fixed_dictionaries(
    {},
    optional={"audio": _audio_field, "text": st.text(max_size=12) | _json_values, "id": _json_values,
              "lang": st.text(max_size=3) | _json_values,
              "words": st.lists(st.fixed_dictionaries({}, optional={"word": _json_values, "start": _json_values,
                                                                    "end": _json_values}), max_size=3) | _json_values},
)
_manifest_text = st.lists(st.one_of(_records.map(json.dumps), st.text(max_size=20)), max_size=5).map("\n".join)
MANIFEST_BYTES = st.one_of(st.binary(max_size=256), _manifest_text.map(lambda t: t.encode("utf-8", "surrogatepass")))
(WORK / "clip.wav").write_bytes(AUDIO_SEEDS[0])


@FUZZ
@given(MANIFEST_BYTES)
def test_manifest_readers(data):
    path = _write(data, ".jsonl")
    try:
        for reader in (lambda p: list(read_eval_manifest(p)), read_profiling_manifest):
            try:
                assert isinstance(reader(path), list)
            except AudiokvError as error:
                assert "\n" not in str(error)
    finally:
        path.unlink()


@FUZZ
@given(st.one_of(st.binary(max_size=512), mutated(AUDIO_SEEDS)), st.sampled_from([".wav", ".flac", ".ogg", ".mp3"]))
def test_audio_loader(data, suffix):
    path = _write(data, suffix)
    try:
        samples = load_audio(path, max_seconds=60)
        assert samples.dtype == np.float32 and samples.ndim == 1 and np.isfinite(samples).all()
    except AudiokvError as error:
        assert "\n" not in str(error)
    finally:
        path.unlink()
