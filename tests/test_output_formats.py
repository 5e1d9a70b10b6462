"""txt / json / srt / vtt writers: valid subtitles (parsed back), JSON with timed segments, whole files only."""

from __future__ import annotations

import json

import pytest

from audiokv_cli.io import files
from audiokv_cli.runtime.longform import Segment, Transcript
from audiokv_cli.io.output_formats import (
    parse_srt, parse_vtt, render, timestamp, to_srt, to_vtt, transcript_of_clip, write_transcript,
)


def transcript(segments) -> Transcript:
    return Transcript(
        clip="talk/meeting.wav", text=" ".join(s.text for s in segments), segments=segments, model="whisper-base",
        method="audiokv", retention=0.5, language="en", audio_seconds=4000.0, windows=140, generated_tokens=900,
        kv_bytes_full=18_432_000, kv_bytes_kept_max=9_216_000, kv_bytes_kept_total=1_290_240_000,
        seconds_prefill=10.0, seconds_decode=50.0, seconds_total=70.0,
    )


SEGMENTS = [
    Segment(0.0, 2.5, " Hello there."),
    Segment(2.5, 2.5, "A zero-length cue --> still valid"),
    Segment(61.25, 65.0, "Line one\nwrapped"),
    Segment(3725.004, 3730.9996, "After an hour."),
    Segment(3731.0, 3732.0, "   "),  # nothing to show: no cue
]


def test_timestamps():
    assert timestamp(0, ",") == "00:00:00,000"
    assert timestamp(3725.0049, ".") == "01:02:05.005"
    assert timestamp(100 * 3600 + 1.5, ",") == "100:00:01,500"


def test_srt_parses_back():
    cues = parse_srt(to_srt(transcript(SEGMENTS)))
    assert [c[2] for c in cues] == ["Hello there.", "A zero-length cue -> still valid", "Line one wrapped", "After an hour."]
    assert cues[0][:2] == (0.0, 2.5) and cues[1][1] > cues[1][0]
    assert cues[3][:2] == (3725.004, 3731.0)
    assert all(end >= start for start, end, _ in cues)


def test_vtt_parses_back():
    text = to_vtt(transcript(SEGMENTS))
    assert text.startswith("WEBVTT\n\n")
    cues = parse_vtt(text)
    assert len(cues) == 4 and cues[2][:2] == (61.25, 65.0)


def test_empty_transcript_is_still_valid():
    empty = transcript([])
    assert parse_srt(to_srt(empty)) == []
    assert parse_vtt(to_vtt(empty)) == []


def test_json_has_segments_bytes_and_timings():
    record = json.loads(render(transcript(SEGMENTS[:1]), "json"))
    assert record["segments"][0]["start"] == 0.0 and record["segments"][0]["end"] == 2.5
    assert "tokens" not in record["segments"][0]
    assert record["kv_bytes_kept_max"] == 9_216_000 and record["kv_bytes_kept_total"] == 1_290_240_000
    assert record["kept_ratio_max"] == 0.5 and record["real_time_factor"] == pytest.approx(70 / 4000, abs=1e-4)


def test_clip_results_become_one_segment():
    from types import SimpleNamespace

    # the fields of inference.ClipResult that a transcript takes
    clip = SimpleNamespace(
        clip="a.wav", text="hi there", model="tiny", method="full", retention=1.0, audio_seconds=2.0,
        generated_tokens=2, kv_bytes_full=100, kv_bytes_kept=100, seconds_prefill=0.1, seconds_decode=0.2,
        hit_token_limit=False, kv_bytes_full_16bit=50, kv_bits=32, kv_budget=None, merge="none",
    )
    cues = parse_srt(to_srt(transcript_of_clip(clip)))
    assert cues == [(0.0, 2.0, "hi there")]


def test_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = write_transcript(transcript(SEGMENTS), "srt", tmp_path)
    assert path == tmp_path / "meeting.srt"
    before = path.read_text()

    def interrupted(handle, data):
        handle.write(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_transcript(transcript(SEGMENTS[:1]), "srt", tmp_path)
    with pytest.raises(KeyboardInterrupt):
        write_transcript(transcript(SEGMENTS[:1]), "vtt", tmp_path)
    assert path.read_text() == before  # the old file is untouched, no new one, no temporary left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meeting.srt"]
