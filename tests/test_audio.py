import warnings

import numpy as np
import pytest
import soundfile

from audiokv_cli.io.audio import SAMPLE_RATE, AudioError, SilentAudioWarning, load_audio
from tests.conftest import write_tone


def test_resamples_and_downmixes_to_16k_mono(tmp_path):
    path = write_tone(tmp_path / "stereo44.wav", seconds=1.5, rate=44100, channels=2)
    samples = load_audio(path)
    assert samples.dtype == np.float32
    assert samples.ndim == 1
    assert abs(samples.shape[0] - int(1.5 * SAMPLE_RATE)) <= 2


@pytest.mark.parametrize("fmt", ["flac", "ogg"])
def test_reads_compressed_formats(tmp_path, fmt):
    wav = write_tone(tmp_path / "a.wav", seconds=1.0)
    data, rate = soundfile.read(str(wav))
    out = tmp_path / f"a.{fmt}"
    soundfile.write(str(out), data, rate)
    assert abs(load_audio(out).shape[0] - SAMPLE_RATE) <= 2


def test_missing_path(tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        load_audio(tmp_path / "nope.wav")


def test_directory(tmp_path):
    with pytest.raises(AudioError, match="is a directory"):
        load_audio(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match="empty file"):
        load_audio(path)


def test_not_audio(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 20)
    with pytest.raises(AudioError, match="not a readable audio file"):
        load_audio(path)


def test_zero_length_audio(tmp_path):
    path = tmp_path / "zero.wav"
    soundfile.write(str(path), np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match="zero-length"):
        load_audio(path)


def test_nan_samples(tmp_path):
    path = tmp_path / "nan.wav"
    data = np.full(SAMPLE_RATE, 0.1, dtype=np.float32)
    data[100] = np.nan
    soundfile.write(str(path), data, SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN or infinite"):
        load_audio(path)


def test_silence_warns(tmp_path):
    path = tmp_path / "silent.wav"
    soundfile.write(str(path), np.zeros(SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = load_audio(path)
    assert samples.shape[0] == SAMPLE_RATE
    assert any(issubclass(w.category, SilentAudioWarning) for w in caught)


def test_max_duration(tmp_path):
    path = write_tone(tmp_path / "long.wav", seconds=3.0)
    assert load_audio(path, max_seconds=3.0).shape[0] == 3 * SAMPLE_RATE
    with pytest.raises(AudioError, match="longer than this model's limit of 2 s"):
        load_audio(path, max_seconds=2.0)
