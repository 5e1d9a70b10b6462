"""Synthetic probe clips with exact word timings: English text spoken word by word with espeak-ng.

Each word is synthesized on its own, trimmed of its leading and trailing silence, and the words are concatenated
with short pauses, so every word's start and end in the clip are known to the sample. Output: 16 kHz mono wavs and
a ``manifest.jsonl`` whose words carry confidence 1.0, ready for ``audiokv profile --aligner manifest``.
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import subprocess
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from audiokv_cli.io.audio import SAMPLE_RATE
from audiokv_cli.errors import AudiokvError
from audiokv_cli.profiling.alignment import MANIFEST_NAME, Clip, WordTiming, write_manifest

DEFAULT_TEXT_DIR = Path("/usr/share/common-licenses")
DEFAULT_VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb+m3", "en-us+m2", "en-gb-x-rp+f2")
# Below this fraction of a word's peak, leading/trailing samples count as silence.
TRIM_FRACTION = 0.02
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


@dataclass(frozen=True)
class ProbeOptions:
    n: int = 100
    min_words: int = 4
    max_words: int = 10
    voices: tuple[str, ...] = DEFAULT_VOICES
    seed: int = 0
    gap_seconds: tuple[float, float] = (0.06, 0.18)
    speed_wpm: tuple[int, int] = (145, 185)
    lead_seconds: float = 0.2


def espeak_binary() -> str:
    found = shutil.which("espeak-ng")
    if found is None:
        raise AudiokvError("espeak-ng is not installed; install it (e.g. `apt-get install espeak-ng`) to make probe sets")
    return found


def text_words(sources: Sequence[Path]) -> list[str]:
    """English words from the text files, in reading order (ALL-CAPS headings and one-letter noise dropped)."""
    words: list[str] = []
    for source in sources:
        try:
            text = Path(source).read_text(encoding="utf-8", errors="ignore")
        except OSError as error:
            raise AudiokvError(f"{source}: cannot read text ({error.strerror})") from None
        words.extend(w for w in _WORD.findall(text) if (len(w) > 1 or w in ("a", "I")) and not w.isupper())
    if len(words) < 50:
        raise AudiokvError("the text sources hold too few English words to make probe clips")
    return words


def default_text_sources() -> list[Path]:
    if not DEFAULT_TEXT_DIR.is_dir():
        raise AudiokvError(f"{DEFAULT_TEXT_DIR} is missing; pass English text files with --text")
    return sorted(p for p in DEFAULT_TEXT_DIR.iterdir() if p.is_file())


def _resample(samples: np.ndarray, rate: int) -> np.ndarray:
    if rate == SAMPLE_RATE:
        return samples
    import librosa

    return librosa.resample(samples, orig_sr=rate, target_sr=SAMPLE_RATE).astype(np.float32)


def synthesize_word(word: str, voice: str, speed: int, binary: str | None = None) -> np.ndarray:
    """One word as 16 kHz float32, silence trimmed."""
    command = [binary or espeak_binary(), "-v", voice, "-s", str(speed), "--stdout", word]
    try:
        result = subprocess.run(command, capture_output=True, check=True, timeout=30)
    except subprocess.CalledProcessError as error:
        message = error.stderr.decode(errors="ignore").strip().splitlines()
        raise AudiokvError(f"espeak-ng failed for voice {voice!r}: {message[0] if message else error}") from None
    with wave.open(io.BytesIO(result.stdout)) as wav:
        rate, width, channels = wav.getframerate(), wav.getsampwidth(), wav.getnchannels()
        frames = wav.readframes(wav.getnframes())
    if width != 2 or not frames:
        raise AudiokvError(f"espeak-ng produced no usable audio for {word!r} (voice {voice!r})")
    samples = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    samples = _resample(samples, rate)
    loud = np.flatnonzero(np.abs(samples) >= TRIM_FRACTION * max(float(np.abs(samples).max()), 1e-6))
    if loud.size == 0:
        raise AudiokvError(f"espeak-ng produced silence for {word!r} (voice {voice!r})")
    return samples[loud[0] : loud[-1] + 1]


def make_clip(words: Sequence[str], voice: str, speed: int, rng: random.Random, options: ProbeOptions):
    """Concatenate per-word audio with pauses; returns samples and exact word timings."""
    binary = espeak_binary()
    pieces = [np.zeros(int(options.lead_seconds * SAMPLE_RATE), dtype=np.float32)]
    cursor = pieces[0].size
    timings = []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        audios = list(pool.map(lambda w: synthesize_word(w, voice, speed, binary), words))
    for index, (word, audio) in enumerate(zip(words, audios)):
        timings.append(WordTiming(word, cursor / SAMPLE_RATE, (cursor + audio.size) / SAMPLE_RATE, 1.0))
        pieces.append(audio)
        cursor += audio.size
        gap = options.lead_seconds if index == len(words) - 1 else rng.uniform(*options.gap_seconds)
        pieces.append(np.zeros(int(gap * SAMPLE_RATE), dtype=np.float32))
        cursor += pieces[-1].size
    samples = np.concatenate(pieces)
    peak = float(np.abs(samples).max())
    if peak > 0:
        samples = samples * (0.8 / peak)
    return samples.astype(np.float32), timings


def write_wav(path: Path, samples: np.ndarray) -> None:
    import soundfile

    soundfile.write(str(path), samples, SAMPLE_RATE, subtype="PCM_16")


def build_probe_set(
    out_dir: str | Path,
    options: ProbeOptions,
    text_sources: Sequence[Path] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Clip]:
    """Write ``options.n`` clips and ``manifest.jsonl`` into ``out_dir``; returns the clips."""
    if options.n < 1:
        raise AudiokvError(f"--n must be at least 1, got {options.n}")
    if not 1 <= options.min_words <= options.max_words:
        raise AudiokvError("words per clip: need 1 <= --min-words <= --max-words")
    if not options.voices:
        raise AudiokvError("no voices given")
    espeak_binary()
    words = text_words(text_sources or default_text_sources())
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AudiokvError(f"{out_dir}: cannot create the probe-set folder ({error.strerror or error})") from None
    manifest = out_dir / MANIFEST_NAME
    if manifest.exists():
        raise AudiokvError(f"{out_dir} already holds a probe set ({MANIFEST_NAME}); choose another --out")
    rng = random.Random(options.seed)
    clips: list[Clip] = []
    for index in range(options.n):
        count = rng.randint(options.min_words, options.max_words)
        first = rng.randrange(0, len(words) - count)
        chosen = words[first : first + count]
        voice = options.voices[index % len(options.voices)]
        speed = rng.randint(*options.speed_wpm)
        samples, timings = make_clip(chosen, voice, speed, rng, options)
        name = f"probe-{options.seed}-{index:05d}.wav"  # the seed keeps ids unique across shards
        temp = out_dir / f".{name}.tmp.wav"
        write_wav(temp, samples)
        temp.replace(out_dir / name)
        clips.append(Clip(clip_id=name[:-4], audio_path=out_dir / name, text=" ".join(chosen), words=timings))
        if progress is not None:
            progress(index + 1, options.n)
    write_manifest(manifest, clips, relative_to=out_dir)
    return clips
