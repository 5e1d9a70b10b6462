"""Evaluation data readers: a JSONL manifest, the LibriSpeech layout, or audio files beside .txt transcripts.

Each reader yields Example(id, audio_path, text, lang) in a deterministic order; load_dataset picks the reader
from what is on disk. Layouts are described in docs/evaluation.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from audiokv_cli.errors import AudiokvError

AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".webm"})
MANIFEST_SUFFIXES = frozenset({".jsonl", ".ndjson"})
# A directory holding one of these is read as a manifest (checked before the directory layouts).
DIRECTORY_MANIFEST_NAMES = ("manifest.jsonl",)
LIBRISPEECH_TRANSCRIPT_GLOB = "*.trans.txt"
DEFAULT_LANG = "en"


class DatasetError(AudiokvError):
    """An evaluation data set is missing, empty or malformed."""


@dataclass(frozen=True)
class Example:
    """One evaluation clip: an audio file and its reference transcript."""

    id: str
    audio_path: Path
    text: str
    lang: str = DEFAULT_LANG
    # Other manifest fields (word timings, duration, speaker...), passed through untouched.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)


def _is_audio(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: cannot read transcript ({error})") from None


def _require_audio(audio_path: Path, where: str) -> None:
    if not audio_path.is_file():
        raise DatasetError(f"{where}: audio file {audio_path} does not exist")


# ------------------------------------------------------------------------------------------------------ manifest


def read_manifest(path: str | Path, default_lang: str = DEFAULT_LANG) -> Iterator[Example]:
    """Examples from a JSONL manifest, one object per line, in file order.

    Keys: ``audio`` (path, absolute or relative to the manifest's directory), ``text``, optional ``lang``,
    optional ``id`` (default: the audio path relative to the manifest directory, without its suffix).
    Other keys land in Example.extra. Blank lines are skipped.
    """
    path = Path(path)
    try:
        handle = path.open(encoding="utf-8")
    except OSError as error:
        raise DatasetError(f"{path}: cannot read manifest ({error.strerror or error})") from None
    with handle:
        try:
            yield from _manifest_examples(path, handle, default_lang)
        except UnicodeDecodeError:
            raise DatasetError(f"{path}: manifest is not UTF-8 text") from None


def _manifest_examples(path: Path, lines: Iterable[str], default_lang: str) -> Iterator[Example]:
    base = path.parent
    seen: set[str] = set()
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{where}: malformed JSON ({error.msg})") from None
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        audio, text = entry.get("audio"), entry.get("text")
        if not isinstance(audio, str) or not audio:
            raise DatasetError(f'{where}: needs an "audio" path string')
        if not isinstance(text, str):
            raise DatasetError(f'{where}: needs a "text" string')
        if not text.strip():
            raise DatasetError(f'{where}: "text" is empty (WER needs a reference transcript)')
        lang = entry.get("lang", default_lang)
        if not isinstance(lang, str) or not lang:
            raise DatasetError(f'{where}: "lang" must be a non-empty string')
        audio_path = Path(audio).expanduser()
        if not audio_path.is_absolute():
            audio_path = base / audio_path
        _require_audio(audio_path, where)
        clip_id = entry.get("id")
        if clip_id is None:
            clip_id = Path(audio).with_suffix("").as_posix()
        clip_id = str(clip_id)
        if clip_id in seen:
            raise DatasetError(f'{where}: duplicate id "{clip_id}"')
        seen.add(clip_id)
        extra = {key: value for key, value in entry.items() if key not in {"audio", "text", "lang", "id"}}
        yield Example(clip_id, audio_path, text, lang, extra)


# --------------------------------------------------------------------------------------------------- LibriSpeech


def read_librispeech(root: str | Path) -> Iterator[Example]:
    """Examples from the LibriSpeech layout: ``<spk>/<chapter>/<spk>-<chapter>.trans.txt`` with lines
    ``UTTID TEXT`` beside ``UTTID.flac``, anywhere under ``root``; sorted by transcript path, then line order
    (which LibriSpeech keeps sorted by utterance id)."""
    root = Path(root)
    for transcript in sorted(root.rglob(LIBRISPEECH_TRANSCRIPT_GLOB)):
        lines = _read_text(transcript).splitlines()
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{transcript}:{line_number}"
            parts = line.strip().split(maxsplit=1)
            utterance = parts[0]
            text = parts[1] if len(parts) > 1 else ""
            audio_path = _find_audio(transcript.parent, utterance)
            if audio_path is None:
                raise DatasetError(f"{where}: audio file {transcript.parent / utterance}.flac does not exist")
            yield Example(utterance, audio_path, text, "en")


def _find_audio(directory: Path, stem: str) -> Path | None:
    flac = directory / f"{stem}.flac"
    if flac.is_file():
        return flac
    # Converted copies of LibriSpeech (wav, mp3) keep the layout.
    for suffix in sorted(AUDIO_SUFFIXES):
        candidate = directory / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


# ----------------------------------------------------------------------------------------- audio + .txt directory


def read_paired_directory(root: str | Path, default_lang: str = DEFAULT_LANG) -> Iterator[Example]:
    """Examples from audio files with a same-named ``.txt`` transcript beside them (``a.wav`` + ``a.txt``),
    anywhere under ``root``, sorted by path. Every audio file needs its transcript, so that no clip silently
    drops out of the evaluation. The id is the audio path relative to ``root`` without its suffix."""
    root = Path(root)
    for audio_path in sorted(path for path in root.rglob("*") if _is_audio(path)):
        transcript = audio_path.with_suffix(".txt")
        if not transcript.is_file():
            raise DatasetError(f"{audio_path}: no transcript (expected {transcript.name} beside it)")
        text = " ".join(_read_text(transcript).split())
        clip_id = audio_path.relative_to(root).with_suffix("").as_posix()
        yield Example(clip_id, audio_path, text, default_lang)


def _has_paired_audio(root: Path) -> bool:
    return any(_is_audio(path) and path.with_suffix(".txt").is_file() for path in root.rglob("*"))


# ---------------------------------------------------------------------------------------------------- detection


def detect_layout(path: str | Path) -> str:
    """Which reader fits ``path``: "manifest", "librispeech" or "paired"."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix.lower() in MANIFEST_SUFFIXES:
            return "manifest"
        raise DatasetError(f"{path}: not a data set (expected a .jsonl manifest or a directory)")
    if any(path.joinpath(name).is_file() for name in DIRECTORY_MANIFEST_NAMES):
        return "manifest"
    if next(path.rglob(LIBRISPEECH_TRANSCRIPT_GLOB), None) is not None:
        return "librispeech"
    if _has_paired_audio(path):
        return "paired"
    raise DatasetError(
        f"{path}: no data set found (expected manifest.jsonl, LibriSpeech *.trans.txt files, "
        "or audio files with same-named .txt transcripts)"
    )


def iter_dataset(path: str | Path, default_lang: str = DEFAULT_LANG) -> Iterator[Example]:
    """Examples of the data set at ``path`` (layout detected as in load_dataset), read lazily."""
    path = Path(path)
    layout = detect_layout(path)
    if layout == "manifest":
        manifest = path
        if path.is_dir():
            manifest = next(path / name for name in DIRECTORY_MANIFEST_NAMES if (path / name).is_file())
        return read_manifest(manifest, default_lang)
    if layout == "librispeech":
        return read_librispeech(path)
    return read_paired_directory(path, default_lang)


def load_dataset(path: str | Path, limit: int | None = None, default_lang: str = DEFAULT_LANG) -> list[Example]:
    """Read the evaluation set at ``path``; keep the first ``limit`` examples when given.

    ``path`` is a JSONL manifest file, a directory holding ``manifest.jsonl``, a LibriSpeech-style tree
    (``*.trans.txt``), or a directory of audio files with same-named ``.txt`` transcripts.
    Raises DatasetError for a missing path, an empty set, a malformed manifest line or a missing audio file.
    """
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be at least 1, got {limit}")
    examples = list(islice(iter_dataset(path, default_lang), limit))
    if not examples:
        raise DatasetError(f"{path}: the data set is empty")
    return examples
