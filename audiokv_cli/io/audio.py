"""Load audio files as 16 kHz mono float32, with clear errors for input that cannot be used."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np

from audiokv_cli.errors import AudiokvError, AudiokvWarning

SAMPLE_RATE = 16000
# Sample rates audio files really use (telephone 8 kHz is common, 4 kHz exists; 768 kHz is the highest DAC rate).
MIN_RATE, MAX_RATE = 1000, 768_000
# Peak amplitude below which a clip is treated as silence (about -80 dBFS).
SILENCE_PEAK = 1e-4

logger = logging.getLogger(__name__)


class AudioError(AudiokvError):
    """An audio file is missing, unreadable, empty, corrupt or too long."""


class SilentAudioWarning(UserWarning):
    """The clip holds no signal; a model will usually produce nothing useful."""


class TruncatedAudioWarning(AudiokvWarning):
    """The file holds less audio than its header promises (a cut-off download or copy): the rest is missing."""


def promised_seconds(path: str | os.PathLike) -> float | None:
    """Seconds of audio the file's header promises, or None where it does not say. For WAV the data chunk's size is
    read directly: libsndfile shrinks its frame count to what the file holds, hiding a truncation."""
    import soundfile

    try:
        info = soundfile.info(str(path))
    except Exception:  # noqa: BLE001 - formats soundfile cannot read promise nothing we can check
        return None
    if not info.samplerate:
        return None
    if info.format in ("WAV", "WAVEX"):
        data_bytes, block_align = _wav_data_chunk(Path(path))
        if data_bytes and block_align and data_bytes < 0xFFFFFFF0:  # streaming writers leave the size unset
            return data_bytes / block_align / info.samplerate
        return None
    return info.frames / info.samplerate if info.frames > 0 else None


def _wav_data_chunk(path: Path) -> tuple[int | None, int | None]:
    """(the 'data' chunk's declared size, the 'fmt ' chunk's block alignment) from a RIFF header."""
    import struct

    block_align = None
    with open(path, "rb") as handle:
        if handle.read(12)[:4] != b"RIFF":
            return None, None
        while True:
            header = handle.read(8)
            if len(header) < 8:
                return None, block_align
            chunk, size = header[:4], struct.unpack("<I", header[4:])[0]
            if chunk == b"data":
                return size, block_align
            body = handle.read(min(size, 64)) if chunk == b"fmt " else b""
            if chunk == b"fmt " and len(body) >= 14:
                block_align = struct.unpack("<H", body[12:14])[0]
            handle.seek(size - len(body) + (size & 1), os.SEEK_CUR)


def check_complete(path: str | os.PathLike, read_seconds: float, promised: float | None = None) -> None:
    """Warn (TruncatedAudioWarning, one line) when fewer seconds were read than the header promises."""
    promised = promised_seconds(path) if promised is None else promised
    if promised is not None and read_seconds < promised - max(0.05, 0.001 * promised):
        warnings.warn(
            f"{path}: truncated file: {read_seconds:.1f} s of audio read, its header promises {promised:.1f} s",
            TruncatedAudioWarning, stacklevel=3,
        )


def _read(path: Path) -> tuple[np.ndarray, int]:
    # soundfile is exact and fast for wav/flac/ogg; librosa (audioread/ffmpeg) covers mp3 and the rest.
    import soundfile

    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        return data.T, rate
    except Exception as sf_error:  # noqa: BLE001 - any decoder failure falls through to the second decoder
        try:
            import librosa

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data, rate = librosa.load(str(path), sr=None, mono=False, dtype=np.float32)
            return np.atleast_2d(data), int(rate)
        except Exception:  # noqa: BLE001
            raise AudioError(f"{path}: not a readable audio file ({_short(sf_error)})") from None


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def check_path(path: Path) -> None:
    """One line for a path that cannot be audio: missing, a directory, empty."""
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, not an audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file")


def load_audio(path: str | os.PathLike, max_seconds: float | None = None) -> np.ndarray:
    """Return the file's samples as mono float32 at 16 kHz.

    Raises AudioError (one line) for a missing path, a directory, an unreadable or non-audio file, zero-length audio,
    NaN/inf samples or audio longer than ``max_seconds``; warns (SilentAudioWarning) for all-silent audio.
    """
    path = Path(path)
    check_path(path)
    channels, rate = _read(path)
    if channels.size == 0 or channels.shape[-1] == 0:
        raise AudioError(f"{path}: zero-length audio")
    if not np.all(np.isfinite(channels)):
        raise AudioError(f"{path}: audio contains NaN or infinite samples")
    if not MIN_RATE <= rate <= MAX_RATE:  # a damaged header; resampling from 1 Hz would need gigabytes
        raise AudioError(f"{path}: sample rate {rate} Hz is not an audio rate ({MIN_RATE}-{MAX_RATE} Hz)")
    check_complete(path, channels.shape[-1] / rate)
    samples = channels.mean(axis=0).astype(np.float32)
    if rate != SAMPLE_RATE:
        import librosa

        samples = librosa.resample(samples, orig_sr=rate, target_sr=SAMPLE_RATE).astype(np.float32)
    seconds = samples.shape[0] / SAMPLE_RATE
    if max_seconds is not None and seconds > max_seconds + 1e-6:
        raise AudioError(
            f"{path}: {seconds:.1f} s of audio is longer than this model's limit of {max_seconds:g} s "
            "(split the file, or raise the limit with --max-seconds)"
        )
    if float(np.abs(samples).max()) < SILENCE_PEAK:
        warnings.warn(f"{path}: audio is silent", SilentAudioWarning, stacklevel=2)
    return samples


def split_audio(samples: np.ndarray, segment_seconds: float) -> list[np.ndarray]:
    """Consecutive segments of at most ``segment_seconds`` covering every sample, all of (nearly) equal length.

    Equal lengths rather than full segments plus a remainder: a last segment of a fraction of a second would give
    the model a handful of audio tokens with no context.
    """
    limit = int(segment_seconds * SAMPLE_RATE)
    if limit < 1:
        raise ValueError(f"segment length must be at least one sample, got {segment_seconds} s")
    count = max(1, -(-samples.shape[0] // limit))
    bounds = np.linspace(0, samples.shape[0], count + 1).round().astype(int)
    return [samples[start:end] for start, end in zip(bounds[:-1], bounds[1:])]


def audio_duration(path: str | os.PathLike) -> float | None:
    """Seconds of audio from the file header alone (no decoding), or None where the header does not say."""
    import soundfile

    try:
        info = soundfile.info(str(path))
    except Exception:  # noqa: BLE001 - formats soundfile cannot read are measured when they are decoded
        return None
    return info.frames / info.samplerate if info.samplerate else None


def check_length(samples: np.ndarray, max_seconds: float) -> None:
    """Refuse a clip longer than a model takes: adapters call this instead of letting a processor cut it."""
    seconds = samples.shape[0] / SAMPLE_RATE
    if seconds > max_seconds + 1e-6:
        raise AudioError(f"{seconds:.1f} s of audio is longer than this model's limit of {max_seconds:g} s")
