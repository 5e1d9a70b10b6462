"""Transcripts written the ways people use them: plain text, JSON with timed segments, SRT and WebVTT subtitles.

The file names follow openai-whisper's CLI (`--output_format`, `--output_dir`): CLIP.txt, CLIP.json, CLIP.srt,
CLIP.vtt beside each other in one folder. Every file is written atomically (files.write_atomic): a run stopped
with Ctrl-C, a full disk or a failure in a later clip leaves each output whole or absent, never half-written.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Iterable

from audiokv_cli.io.files import write_atomic

FORMATS = ("txt", "json", "srt", "vtt")


class OutputFormat(str, Enum):
    txt = "txt"
    json = "json"
    srt = "srt"
    vtt = "vtt"


def transcript_of_clip(result):
    """A one-window `ClipResult` (any family; Whisper without timestamps) as a `longform.Transcript` with one
    segment over the whole clip, so every format can be written for it."""
    from audiokv_cli.runtime.longform import Segment, Transcript

    segments = [Segment(start=0.0, end=float(result.audio_seconds), text=result.text)] if result.text else []
    return Transcript(
        clip=result.clip, text=result.text, segments=segments, model=result.model, method=result.method,
        retention=result.retention, language="", audio_seconds=result.audio_seconds, windows=1,
        generated_tokens=result.generated_tokens, kv_bytes_full=result.kv_bytes_full,
        kv_bytes_kept_max=result.kv_bytes_kept, kv_bytes_kept_total=result.kv_bytes_kept,
        seconds_prefill=result.seconds_prefill, seconds_decode=result.seconds_decode,
        seconds_total=round(result.seconds_prefill + result.seconds_decode, 4), hit_token_limit=int(result.hit_token_limit),
        kv_bytes_full_16bit=result.kv_bytes_full_16bit, kv_bits=result.kv_bits, kv_budget=result.kv_budget,
        merge=result.merge,
    )


def timestamp(seconds: float, separator: str) -> str:
    """``HH:MM:SS<separator>mmm`` (SRT: ``,``; WebVTT: ``.``); hours grow past 99 rather than wrap."""
    millis = max(0, int(round(seconds * 1000)))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _cues(transcript) -> Iterable[tuple[float, float, str]]:
    """Segments as subtitle cues: text on one line, end after start (a zero-length cue is given 10 ms), in order."""
    for segment in transcript.segments:
        text = " ".join(segment.text.split())
        if not text:
            continue
        # "-->" inside a cue would end it early in both formats
        text = text.replace("-->", "->")
        end = segment.end if segment.end > segment.start else segment.start + 0.01
        yield segment.start, end, text


def to_srt(transcript) -> str:
    blocks = [
        f"{index}\n{timestamp(start, ',')} --> {timestamp(end, ',')}\n{text}\n"
        for index, (start, end, text) in enumerate(_cues(transcript), start=1)
    ]
    return "\n".join(blocks)


def to_vtt(transcript) -> str:
    blocks = ["WEBVTT\n"]
    blocks += [f"{timestamp(start, '.')} --> {timestamp(end, '.')}\n{text}\n" for start, end, text in _cues(transcript)]
    return "\n".join(blocks)


def to_txt(transcript) -> str:
    return transcript.text + "\n"


def to_json(transcript, details: bool = False) -> str:
    return json.dumps(transcript.to_json(details), ensure_ascii=False) + "\n"


def render(transcript, fmt: str, details: bool = False) -> str:
    fmt = fmt.value if isinstance(fmt, OutputFormat) else fmt
    if fmt == "json":
        return to_json(transcript, details)
    return {"txt": to_txt, "srt": to_srt, "vtt": to_vtt}[fmt](transcript)


def output_path(output_dir: Path, clip: str, fmt: str) -> Path:
    fmt = fmt.value if isinstance(fmt, OutputFormat) else fmt
    return Path(output_dir) / f"{Path(clip).stem}.{fmt}"


def write_transcript(transcript, fmt: str, output_dir: Path, details: bool = False) -> Path:
    """CLIP.<fmt> in ``output_dir``, written whole or not at all."""
    return write_atomic(output_path(output_dir, transcript.clip, fmt), render(transcript, fmt, details))


# ------------------------------------------------------------------------------------ readers (tests, round trips)


def _parse_time(text: str, separator: str) -> float:
    clock, millis = text.strip().split(separator)
    hours, minutes, seconds = clock.split(":")
    if len(minutes) != 2 or len(seconds) != 2 or len(millis) != 3:
        raise ValueError(f"bad timestamp {text!r}")
    return int(hours) * 3600 + int(minutes) * 60 + int(seconds) + int(millis) / 1000


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    """Strict SRT reader: numbered cues from 1, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, text, a blank line between."""
    cues = []
    blocks = [block for block in text.strip("\n").split("\n\n")] if text.strip() else []
    for number, block in enumerate(blocks, start=1):
        lines = block.split("\n")
        if len(lines) < 3 or lines[0] != str(number):
            raise ValueError(f"cue {number}: bad block {block!r}")
        start, arrow, end = lines[1].partition(" --> ")
        if not arrow:
            raise ValueError(f"cue {number}: no '-->' in {lines[1]!r}")
        start_s, end_s = _parse_time(start, ","), _parse_time(end, ",")
        if end_s < start_s:
            raise ValueError(f"cue {number}: ends before it starts")
        cues.append((start_s, end_s, "\n".join(lines[2:])))
    return cues


def parse_vtt(text: str) -> list[tuple[float, float, str]]:
    """Strict WebVTT reader: the ``WEBVTT`` header, then cues ``HH:MM:SS.mmm --> HH:MM:SS.mmm`` and their text."""
    blocks = text.strip("\n").split("\n\n")
    if not blocks or blocks[0].split("\n")[0] != "WEBVTT":
        raise ValueError("no WEBVTT header")
    cues = []
    for block in blocks[1:]:
        lines = block.split("\n")
        start, arrow, end = lines[0].partition(" --> ")
        if not arrow or len(lines) < 2:
            raise ValueError(f"bad cue {block!r}")
        start_s, end_s = _parse_time(start, "."), _parse_time(end, ".")
        if end_s < start_s:
            raise ValueError(f"cue ends before it starts: {lines[0]!r}")
        cues.append((start_s, end_s, "\n".join(lines[1:])))
    return cues
