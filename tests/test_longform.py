"""Whisper on audio of any length (longform.py): streamed reading, windows and their seeks, timed segments,
batched files with the tokens of one file at a time, and the command line's outputs and failures."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile
from typer.testing import CliRunner

from audiokv_cli.io.audio import load_audio
from audiokv_cli.cli import app
from audiokv_cli.compression.methods import build_policy
from audiokv_cli.runtime.longform import (
    BLOCK_SAMPLES, WINDOW_SAMPLES, AudioStream, FileJob, LongformOptions, needs_fallback, transcribe_files,
    WindowOutput, window_seed,
)
from audiokv_cli.models.registry import load_adapter
from audiokv_cli.io.output_formats import parse_srt, parse_vtt
from audiokv_cli.testing.families import build_random_whisper
from tests.conftest import speechlike

runner = CliRunner()
# Few temperatures keep the random model's many fallbacks cheap; the rules are the same.
FAST = LongformOptions(temperatures=(0.0, 0.6), max_new_tokens=12)


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    return build_random_whisper(tmp_path_factory.mktemp("tiny-whisper-longform"))


@pytest.fixture(scope="module")
def adapter(whisper_dir):
    adapter = load_adapter(str(whisper_dir), device="cpu", dtype="float32")
    # The character vocabulary has no <|startofprev|>: lend it one, so previous text (and with it prompts of
    # different lengths, left-padded in a batch) is exercised.
    adapter.start_of_previous = adapter.processor.tokenizer.convert_tokens_to_ids("~")
    assert adapter.start_of_previous != adapter.processor.tokenizer.unk_token_id
    return adapter


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("long-audio")
    paths = []
    for index, (seconds, rate) in enumerate([(65.0, 16000), (12.0, 16000), (41.0, 22050)]):
        path = folder / f"f{index}.wav"
        soundfile.write(str(path), speechlike(seconds, index, rate), rate)
        paths.append(path)
    return paths


def test_stream_reads_windows_in_bounded_memory(files):
    path = files[0]
    whole = load_audio(path)
    stream = AudioStream(path)
    assert stream.seconds == pytest.approx(65.0)
    for start in (0, 100_000, 480_000, 900_000):
        window = stream.window(start)
        np.testing.assert_array_equal(window, whole[start : start + WINDOW_SAMPLES])
        # only the samples from the window's start on are held
        assert stream._buffer.shape[0] <= WINDOW_SAMPLES + BLOCK_SAMPLES
    assert stream.window(whole.shape[0]).shape[0] == 0


def test_stream_resamples_as_it_reads(files):
    whole = load_audio(files[2])  # 22.05 kHz: librosa's soxr on the whole file
    stream = AudioStream(files[2])
    pieces = [stream.window(start, 200_000) for start in range(0, whole.shape[0] + 200_000, 200_000)]
    streamed = np.concatenate(pieces)
    assert abs(streamed.shape[0] - whole.shape[0]) <= 2
    n = min(streamed.shape[0], whole.shape[0])
    assert np.abs(streamed[:n] - whole[:n]).max() < 1e-2


def test_windows_cover_the_file_with_ordered_segments(adapter, files):
    [result] = transcribe_files(adapter, [str(files[0])], options=FAST)
    assert result.windows >= 3  # 65 s: at least three 30 s windows
    assert result.audio_seconds == pytest.approx(65.0)
    starts = [segment.start for segment in result.segments]
    assert starts == sorted(starts)
    assert all(0 <= s.start <= s.end <= 65.0 + 1e-6 for s in result.segments)
    assert result.kv_bytes_full == 1500 * adapter.geometry.kv_bytes_per_token(adapter.dtype)
    assert result.kv_bytes_kept_max == result.kv_bytes_full  # full cache
    assert result.kv_bytes_kept_total == result.windows * result.kv_bytes_full - result.skipped_windows * 0


@pytest.mark.parametrize("method,retention", [("full", 1.0), ("snapkv", 0.3), ("stride", 0.5)])
def test_batched_files_give_the_tokens_of_one_at_a_time(adapter, files, method, retention):
    policy = build_policy(method, retention=retention)
    sources = [str(path) for path in files]
    alone = [next(iter(transcribe_files(adapter, [source], policy, FAST))) for source in sources]
    for batch_size in (2, 3):
        together = list(transcribe_files(adapter, sources, policy, FAST, batch_size=batch_size))
        assert [r.clip for r in together] == sources
        for one, many in zip(alone, together):
            assert many.token_ids == one.token_ids
            assert [(s.start, s.end) for s in many.segments] == [(s.start, s.end) for s in one.segments]
            assert many.windows == one.windows and many.fallbacks == one.fallbacks
            assert many.kv_bytes_kept_max == one.kv_bytes_kept_max
    if method != "full":
        assert alone[0].kv_bytes_kept_max < alone[0].kv_bytes_full


def test_guards_follow_transformers_rules():
    def output(ratio, logprob, no_speech):
        return WindowOutput([1], logprob, no_speech, ratio, 0.0, 0, 0.0, 0.0, False)

    options = LongformOptions()
    assert needs_fallback(output(1.0, -0.2, 0.1), options) == (False, False)
    assert needs_fallback(output(2.0, -0.2, 0.1), options) == (True, False)  # a loop compresses well
    assert needs_fallback(output(1.0, -1.5, 0.1), options) == (True, False)
    assert needs_fallback(output(1.0, -1.5, 0.9), options) == (False, True)  # silence: skipped


WORDS = ["one", "two", "three", "four", "five", "x"]


def _text_adapter():
    """What a window's bookkeeping reads of an adapter, with a word vocabulary: word i is token i, text ids stay
    below end-of-text and timestamps start after it, as in Whisper's own vocabulary."""
    return SimpleNamespace(
        language="en", timestamp_prompt_ids=[100], start_of_previous=None, end_of_text=90, timestamp_begin=1000,
        decode=lambda ids: " ".join(WORDS[i] for i in ids),
        model=SimpleNamespace(config=SimpleNamespace(max_target_positions=448)),
    )


def _window_tokens(adapter, parts):
    """Token ids for [(start, end, text), ...] as Whisper writes them: <|start|> words <|end|> per segment."""
    ids = []
    for start, end, text in parts:
        ids.append(adapter.timestamp_begin + round(start / 0.02))
        ids.extend(WORDS.index(word) for word in text.split())
        ids.append(adapter.timestamp_begin + round(end / 0.02))
    return ids


@pytest.mark.parametrize("guarded", [True, False])
def test_a_long_wordless_segment_is_read_again(files, guarded):
    adapter = _text_adapter()
    job = FileJob(adapter, files[0], "f0", LongformOptions(sparse_segment_seconds=8.0 if guarded else None))
    job.next_window()
    # A decoder that jumped a passage: "one two three" in 3 s, then one word stamped across 25 s.
    tokens = _window_tokens(adapter, [(0.0, 3.0, "one two three"), (3.0, 28.0, "x")])
    job.accept(WindowOutput(tokens, -0.2, 0.0, 1.0, 0.0, 0, 0.0, 0.0, False), fallbacks=0, skip=False)
    if guarded:
        assert [segment.text for segment in job.segments] == ["one two three"]
        assert job.seek == 3 * 16000 and job.rewound == 1  # the next window starts at the jumped passage
    else:
        assert [segment.text for segment in job.segments] == ["one two three", "x"] and job.seek >= 28 * 16000
    # A long wordless segment opening the window sends it to the next temperature (reading it again from the same
    # place would repeat it); once the temperatures are spent it is kept.
    start = job.seek
    job.next_window()
    opening = WindowOutput(_window_tokens(adapter, [(0.0, 25.0, "x"), (25.0, 27.0, "four five")]),
                           -0.2, 0.0, 1.0, 0.0, 0, 0.0, 0.0, False)
    plain = WindowOutput(_window_tokens(adapter, [(0.0, 2.0, "one two"), (2.0, 4.0, "four five")]),
                         -0.2, 0.0, 1.0, 0.0, 0, 0.0, 0.0, False)
    assert job.starts_sparse(opening) == guarded and not job.starts_sparse(plain)
    job.accept(opening, fallbacks=5, skip=False)
    assert [segment.text for segment in job.segments[-2:]] == ["x", "four five"]
    assert job.seek > start and job.rewound == int(guarded)


def test_fallback_seed_comes_from_the_audio_not_the_name(files):
    samples = load_audio(files[1])[:WINDOW_SAMPLES]
    assert window_seed(samples) == window_seed(samples.copy() + 1e-7)  # below 16-bit resolution
    assert window_seed(samples) != window_seed(samples[::-1].copy())
    seeds = [FileJob(_text_adapter(), files[1], name, LongformOptions()).next_window().seed
             for name in ("a.wav", "manifest-id-7")]
    assert seeds[0] == seeds[1]


def test_python_api_takes_arrays(adapter):
    import audiokv_cli

    result = audiokv_cli.transcribe(speechlike(35.0, 5), model=adapter, options=FAST, method="snapkv", retention=0.5)
    assert result.windows >= 2 and result.kv_bytes_kept_max < result.kv_bytes_full


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_writes_valid_subtitles_and_json(whisper_dir, files, tmp_path):
    out = tmp_path / "out"
    for fmt in ("srt", "vtt", "json", "txt"):
        result = invoke("infer", files[0], files[1], "--model", whisper_dir, "--format", fmt, "--output-dir", out,
                        "--max-new-tokens", "12", "--method", "snapkv", "--retention", "0.5")
        assert result.exit_code == 0, result.output
    for name in ("f0", "f1"):
        parse_srt((out / f"{name}.srt").read_text())
        parse_vtt((out / f"{name}.vtt").read_text())
        record = json.loads((out / f"{name}.json").read_text())
        assert {"segments", "kv_bytes_full", "kv_bytes_kept_max", "kv_bytes_kept_total", "real_time_factor",
                "seconds_decode", "windows", "text"} <= set(record)
        assert all({"start", "end", "text"} <= set(s) for s in record["segments"])
        assert record["kv_bytes_kept_max"] < record["kv_bytes_full"]
    # one clip: printed to stdout
    result = invoke("infer", files[1], "--model", whisper_dir, "--format", "vtt", "--max-new-tokens", "12")
    assert result.exit_code == 0, result.output
    parse_vtt(result.stdout)


def test_cli_bad_input_is_one_line(whisper_dir, tmp_path):
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not audio at all")
    for bad in (tmp_path / "missing.wav", not_audio, tmp_path):
        result = invoke("infer", bad, "--model", whisper_dir, "--format", "srt")
        assert result.exit_code == 1
        assert "Traceback" not in result.output and result.output.strip().startswith("error:")
        assert len(result.output.strip().splitlines()) == 1


def test_cli_interrupt_leaves_no_output(whisper_dir, files, tmp_path, monkeypatch):
    import audiokv_cli.runtime.longform as longform

    real = longform.decode_windows
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(longform, "decode_windows", interrupted)
    out = tmp_path / "out"
    result = invoke("infer", files[0], "--model", whisper_dir, "--format", "srt", "--output-dir", out,
                    "--max-new-tokens", "8")
    assert result.exit_code == 130
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.slow
def test_real_whisper_long_recording(tmp_path):
    """Whisper tiny.en over 64 s of the example recordings joined with pauses: the words of the clips transcribed one
    by one, at about the right times, as valid subtitles."""
    from audiokv_cli.evaluation.metrics import clip_wer
    from audiokv_cli.runtime.inference import run_clip
    from audiokv_cli.io.output_formats import to_srt

    adapter = load_adapter("whisper-tiny.en", device="cpu", dtype="float32")
    pieces, starts, alone, references, time = [], [], [], [], 0.0
    clips = sorted(Path("examples").glob("clip*.wav"))
    for index in range(9):
        audio = load_audio(clips[index % len(clips)])
        pause = np.zeros(int(16000 * (4.0 + index % 3)), dtype=np.float32)
        pieces += [audio, pause]
        starts.append(time)
        time += (audio.shape[0] + pause.shape[0]) / 16000
        if index < len(clips):
            alone.append(run_clip(adapter, audio).text)
            references.append(clips[index].with_suffix(".txt").read_text().strip())
    path = tmp_path / "long.wav"
    soundfile.write(str(path), np.concatenate(pieces), 16000)
    result = next(iter(transcribe_files(adapter, [str(path)])))
    assert result.windows >= 3
    # as good as the clips one by one, give or take the loose words of a weak model around pauses
    assert clip_wer(" ".join(references * 3), result.text) <= clip_wer(" ".join(references * 3), " ".join(alone * 3)) + 0.25
    for segment, start in zip(result.segments[:3], starts):
        assert abs(segment.start - start) < 1.0
    cues = parse_srt(to_srt(result))
    assert len(cues) >= 8 and cues[-1][1] <= result.audio_seconds + 0.5


def test_language_of_an_english_only_model(whisper_dir, files):
    result = invoke("infer", files[1], "--model", whisper_dir, "--language", "de")
    assert result.exit_code == 1 and "English-only" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_readme_first_command_is_whisper_base():
    """`audiokv infer examples/clip1.wav` with no --model: Whisper base, offline, the clip's words."""
    from audiokv_cli.evaluation.metrics import clip_wer

    result = invoke("infer", "examples/clip1.wav")
    assert result.exit_code == 0, result.output
    assert "whisper-base" in result.output
    text = result.stdout.strip().splitlines()[0]
    assert clip_wer(Path("examples/clip1.txt").read_text(), text) <= 0.2
    detected = invoke("infer", "examples/clip1.wav", "--language", "auto", "--format", "json")
    assert detected.exit_code == 0, detected.output
    assert json.loads(detected.stdout.strip().splitlines()[-1])["language"] == "en"
