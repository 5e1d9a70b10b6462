"""Where each word of a clip is spoken: the ground truth head profiling scores attention against.

Three sources: a JSONL manifest that carries word times (``manifest``), a Whisper checkpoint run through
transformers with token timestamps (``whisper:PATH_OR_ID``), or no timings at all (``none``, which switches the
profile to an alignment-free statistic). Every source yields the same `Clip` records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from audiokv_cli.errors import AudiokvError
from audiokv_cli.io.files import write_atomic

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".m4a", ".opus")


@dataclass(frozen=True)
class WordTiming:
    """One spoken word: its text, start and end in seconds from the clip start, and a confidence in [0, 1]."""

    word: str
    start: float
    end: float
    confidence: float = 1.0

    def to_json(self) -> dict:
        return {"word": self.word, "start": self.start, "end": self.end, "confidence": self.confidence}


@dataclass
class Clip:
    """One profiling clip. ``words`` is None until an aligner has run (or for ``--aligner none``)."""

    clip_id: str
    audio_path: Path
    text: str | None = None
    words: list[WordTiming] | None = None
    _audio_sha256: str | None = field(default=None, repr=False)

    @property
    def audio_sha256(self) -> str:
        if self._audio_sha256 is None:
            digest = hashlib.sha256()
            with open(self.audio_path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            self._audio_sha256 = digest.hexdigest()
        return self._audio_sha256


# ----------------------------------------------------------------------------------------------------------- manifest


def _parse_words(raw, where: str) -> list[WordTiming]:
    if not isinstance(raw, list):
        raise AudiokvError(f"{where}: 'words' must be a list of {{word, start, end, confidence}} objects")
    words = []
    for index, item in enumerate(raw):
        try:
            word = WordTiming(
                word=str(item["word"]),
                start=float(item["start"]),
                end=float(item["end"]),
                confidence=float(item.get("confidence", 1.0)),
            )
        except (KeyError, TypeError, ValueError):
            raise AudiokvError(f"{where}: word {index} needs 'word', 'start' and 'end' (numbers in seconds)") from None
        if not (math.isfinite(word.start) and math.isfinite(word.end)) or word.end < word.start or word.start < 0:
            raise AudiokvError(f"{where}: word {index} ({word.word!r}) has invalid times {word.start}..{word.end}")
        words.append(word)
    return words


def read_manifest(path: str | Path) -> list[Clip]:
    """Read a JSONL manifest: one object per line with ``audio`` (path, relative to the manifest's folder),
    optional ``id``, ``text`` and ``words``. Blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    if not path.is_file():
        raise AudiokvError(f"{path}: no such manifest")
    clips: list[Clip] = []
    seen: set[str] = set()
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AudiokvError(f"{path}: manifest is not UTF-8 text") from None
    except OSError as error:
        raise AudiokvError(f"{path}: cannot read manifest ({error.strerror or error})") from None
    for number, line in enumerate(content.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise AudiokvError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("audio"), str):
            raise AudiokvError(f"{where}: each line needs an 'audio' path")
        audio = Path(record["audio"])
        audio_path = audio if audio.is_absolute() else path.parent / audio
        if not audio_path.is_file():
            raise AudiokvError(f"{where}: audio file {audio_path} does not exist")
        clip_id = str(record.get("id") or record["audio"])
        if clip_id in seen:
            raise AudiokvError(f"{where}: duplicate clip id {clip_id!r}")
        seen.add(clip_id)
        words = _parse_words(record["words"], where) if record.get("words") is not None else None
        text = record.get("text")
        if text is not None and not isinstance(text, str):
            raise AudiokvError(f"{where}: 'text' must be a string")
        if text is None and words is not None:
            text = " ".join(w.word for w in words)
        clips.append(Clip(clip_id=clip_id, audio_path=audio_path, text=text, words=words))
    if not clips:
        raise AudiokvError(f"{path}: manifest holds no clips")
    return clips


def read_data(data: str | Path) -> list[Clip]:
    """Clips from a manifest file, a folder holding ``manifest.jsonl``, or a folder of audio files (no timings)."""
    data = Path(data)
    if data.is_dir():
        manifest = data / MANIFEST_NAME
        if manifest.is_file():
            return read_manifest(manifest)
        files = sorted(p for p in data.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
        if not files:
            raise AudiokvError(f"{data}: holds neither {MANIFEST_NAME} nor audio files")
        return [Clip(clip_id=str(p.relative_to(data)), audio_path=p) for p in files]
    if data.is_file():
        return read_manifest(data)
    raise AudiokvError(f"{data}: no such file or folder")


def write_manifest(path: str | Path, clips: Iterable[Clip], relative_to: Path | None = None) -> None:
    """Write clips as JSONL atomically (paths relative to ``relative_to`` when given)."""
    import os

    path = Path(path)
    lines = []
    for clip in clips:
        audio = clip.audio_path
        if relative_to is not None:
            audio = Path(os.path.relpath(audio, relative_to))
        record: dict = {"id": clip.clip_id, "audio": audio.as_posix()}
        if clip.text is not None:
            record["text"] = clip.text
        if clip.words is not None:
            record["words"] = [w.to_json() for w in clip.words]
        lines.append(json.dumps(record, ensure_ascii=False))
    write_atomic(path, "\n".join(lines) + "\n")


def data_digest(entries: Sequence[tuple[str, str]]) -> str:
    """sha256 over the ordered (clip id, audio sha256) list: identifies exactly which data a profile saw."""
    digest = hashlib.sha256()
    for clip_id, audio_sha in entries:
        digest.update(clip_id.encode("utf-8") + b"\0" + audio_sha.encode("ascii") + b"\n")
    return "sha256:" + digest.hexdigest()


# ------------------------------------------------------------------------------------------------------------ aligners


class Aligner:
    """Fills in ``Clip.words``. ``name`` is what the profile's provenance records."""

    name = "manifest"
    needs_words = True

    def align(self, clip: Clip, audio: np.ndarray) -> list[WordTiming] | None:
        raise NotImplementedError


class ManifestAligner(Aligner):
    name = "manifest"

    def align(self, clip: Clip, audio: np.ndarray) -> list[WordTiming]:
        if clip.words is None:
            raise AudiokvError(
                f"clip {clip.clip_id!r} has no 'words' in the manifest; use --aligner whisper:MODEL or --aligner none"
            )
        return clip.words


class NoAligner(Aligner):
    """No word times: the profile scores each head by its attention mass on the audio span instead."""

    name = "none"
    needs_words = False

    def align(self, clip: Clip, audio: np.ndarray) -> None:
        return None


def incremental_pieces(tokenizer, token_ids: Sequence[int]) -> list[str]:
    """The text each token adds to the decoded string (decoding prefixes keeps multi-byte characters whole)."""
    pieces, previous = [], ""
    for index in range(len(token_ids)):
        text = tokenizer.decode(list(token_ids[: index + 1]), skip_special_tokens=True)
        if text.startswith(previous):
            pieces.append(text[len(previous) :])
            previous = text
        else:  # an incomplete multi-byte character earlier in the prefix: attribute the change to this token
            pieces.append("")
    return pieces


class WhisperAligner(Aligner):
    """Word times from a Whisper checkpoint: token timestamps from its cross-attention alignment heads (DTW),
    tokens grouped into words at spaces, word confidence = mean probability of its tokens."""

    CHUNK_SECONDS = 30.0

    def __init__(self, model_id: str, device: str = "cpu", allow_download: bool = False, max_new_tokens: int = 200):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.name = f"whisper:{model_id}"
        try:
            self.processor = WhisperProcessor.from_pretrained(model_id, local_files_only=not allow_download)
            self.model = WhisperForConditionalGeneration.from_pretrained(model_id, local_files_only=not allow_download)
        except (OSError, ValueError) as error:
            hint = "" if allow_download else " (only local files are used; pass a local folder or a cached Hub id)"
            raise AudiokvError(f"cannot load Whisper aligner {model_id!r}{hint}: {str(error).splitlines()[0]}") from None
        self.model.to(device).eval()
        self.max_new_tokens = max_new_tokens
        if not getattr(self.model.generation_config, "alignment_heads", None):
            raise AudiokvError(
                f"Whisper aligner {model_id!r} has no alignment_heads in its generation config; word timestamps need them"
            )

    def align(self, clip: Clip, audio: np.ndarray) -> list[WordTiming]:
        from audiokv_cli.io.audio import SAMPLE_RATE

        words: list[WordTiming] = []
        step = int(self.CHUNK_SECONDS * SAMPLE_RATE)
        duration = len(audio) / SAMPLE_RATE
        for offset in range(0, max(len(audio), 1), step):
            chunk = audio[offset : offset + step]
            chunk_seconds = len(chunk) / SAMPLE_RATE
            for word in self._align_chunk(chunk):
                start = min(offset / SAMPLE_RATE + min(word.start, chunk_seconds), duration)
                end = min(offset / SAMPLE_RATE + min(max(word.end, word.start), chunk_seconds), duration)
                words.append(WordTiming(word.word, start, end, word.confidence))
        return words

    def _align_chunk(self, chunk: np.ndarray) -> list[WordTiming]:
        import copy

        import torch

        from audiokv_cli.io.audio import SAMPLE_RATE

        features = self.processor(chunk, sampling_rate=SAMPLE_RATE, return_tensors="pt", return_attention_mask=True)
        config = copy.deepcopy(self.model.generation_config)
        config.return_dict_in_generate = True
        config.output_scores = True
        config.max_new_tokens = self.max_new_tokens
        config.max_length = None
        dtype = next(self.model.parameters()).dtype
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            out = self.model.generate(
                features["input_features"].to(device, dtype),
                attention_mask=features["attention_mask"].to(device),
                generation_config=config,
                return_token_timestamps=True,
            )
        sequence = out["sequences"][0].tolist()
        scores = out["scores"]
        times = out["token_timestamps"][0].tolist()
        first = len(sequence) - len(scores)  # the decoder prompt (start-of-transcript, language, task) is not scored
        probabilities = [
            float(torch.softmax(scores[i][0].float(), dim=-1)[sequence[first + i]]) for i in range(len(scores))
        ]
        tokenizer = self.processor.tokenizer
        special = set(tokenizer.all_special_ids)
        positions = [first + i for i in range(len(scores)) if sequence[first + i] not in special]
        pieces = incremental_pieces(tokenizer, [sequence[p] for p in positions])
        return group_words(pieces, positions, times, {p: probabilities[p - first] for p in positions})


def group_words(
    pieces: Sequence[str], positions: Sequence[int], times: Sequence[float], probabilities: dict[int, float]
) -> list[WordTiming]:
    """Group token pieces into words at whitespace. Whisper's token timestamp is the time its token *ends*, so a
    word spans from the timestamp of the token before its first to its last token's timestamp (the convention of
    transformers' ASR pipeline; ``positions`` index ``times``, which includes the decoder prompt)."""
    groups: list[list[int]] = []
    texts: list[str] = []
    new_word = True
    for piece, position in zip(pieces, positions):
        new_word = new_word or piece[:1].isspace()
        text = piece.strip()
        if not text:
            continue
        if new_word:
            groups.append([position])
            texts.append(text)
        else:
            groups[-1].append(position)
            texts[-1] += text
        new_word = piece[-1:].isspace()
    words = []
    for members, text in zip(groups, texts):
        start = float(times[members[0] - 1]) if members[0] > 0 else 0.0
        end = float(times[members[-1]])
        confidence = float(np.mean([probabilities[m] for m in members]))
        words.append(WordTiming(text, start, max(end, start), min(max(confidence, 0.0), 1.0)))
    return words


def make_aligner(spec: str, device: str = "cpu", allow_download: bool = False) -> Aligner:
    """``manifest``, ``none`` or ``whisper:PATH_OR_ID``."""
    if spec == "manifest":
        return ManifestAligner()
    if spec == "none":
        return NoAligner()
    if spec.startswith("whisper:") and len(spec) > len("whisper:"):
        return WhisperAligner(spec[len("whisper:") :], device=device, allow_download=allow_download)
    raise AudiokvError(f"unknown aligner {spec!r}: use manifest, none or whisper:PATH_OR_ID")
