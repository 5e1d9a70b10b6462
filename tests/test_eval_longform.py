"""`audiokv eval` on clips longer than one Whisper window: the long-form path (longform.transcribe_files) per cell,
rows with the fields of one-window rows plus long-form's, and the real-time factor in the summary."""

from __future__ import annotations

import json

import pytest
import soundfile
from typer.testing import CliRunner

from audiokv_cli.cli import app
from audiokv_cli.compression.methods import MethodOptions, resolve_method
from audiokv_cli.evaluation.datasets import Example
from audiokv_cli.evaluation.longform_rows import run_long_clips, split_long
from audiokv_cli.evaluation.sweep import plan_cells, run_sweep
from audiokv_cli.runtime.longform import LongformOptions, transcribe_files
from audiokv_cli.models.registry import load_adapter
from audiokv_cli.testing.families import build_random_whisper
from tests.conftest import speechlike

runner = CliRunner()
# Few temperatures and tokens keep the random model's fallbacks cheap; the rules are the same.
FAST = LongformOptions(temperatures=(0.0, 0.6), max_new_tokens=8)


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    return build_random_whisper(tmp_path_factory.mktemp("tiny-whisper-eval-longform"))


@pytest.fixture(scope="module")
def adapter(whisper_dir):
    return load_adapter(str(whisper_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 40 s clip (two windows) and a 10 s clip (one), with a manifest."""
    folder = tmp_path_factory.mktemp("eval-long")
    lines = []
    for name, seconds in [("long40", 40.0), ("short10", 10.0)]:
        soundfile.write(str(folder / f"{name}.wav"), speechlike(seconds, len(lines)), 16000)
        lines.append(json.dumps({"id": name, "audio": f"{name}.wav", "text": "a b c"}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def cells():
    specs = [resolve_method("full"), resolve_method("stride")]
    return plan_cells(specs, [0.5], ["all"], MethodOptions())


def test_long_rows_are_the_longform_transcripts_with_the_fields_of_short_rows(adapter, data):
    long = Example("long40", data / "long40.wav", "a b c")
    short = Example("short10", data / "short10.wav", "a b c")
    assert split_long(adapter, [short, long]) == ([short], [long])
    planned = cells()
    rows = run_long_clips(adapter, [long], planned, options=FAST)
    assert [(row["clip"], row["method"]) for row in rows] == [("long40", "full"), ("long40", "stride")]
    short_rows = run_sweep(adapter, [short], planned, max_new_tokens=8).clips
    for row, cell in zip(rows, planned):
        # every field a one-window row has, and long-form's own
        assert set(short_rows[0]) <= set(row)
        transcript = next(iter(transcribe_files(adapter, [str(long.audio_path)], cell.policy, FAST, names=["long40"])))
        assert row["hyp"] == transcript.text
        assert row["windows"] == transcript.windows >= 2  # a random model seeks by its own timestamps
        assert row["kv_bytes_full"] == transcript.kv_bytes_full
        assert row["kv_bytes_kept"] == transcript.kv_bytes_kept_max
        assert row["kv_bytes_kept_total"] == transcript.kv_bytes_kept_total
        assert row["generated_tokens"] == transcript.generated_tokens
        assert row["audio_seconds"] == pytest.approx(40.0)
        assert row["real_time_factor"] > 0 and row["longform"] is True
    full, stride = rows
    assert full["kv_bytes_kept"] == full["kv_bytes_full"] and full["retention_run"] == 1.0
    assert stride["kept_ratio"] == pytest.approx(0.5, abs=0.01) and stride["retention_run"] == 0.5
    # resume: rows already done are taken as they are, nothing is decoded again
    done = {(row["clip"], row["method"], row["retention"], row["scope"]): {**row, "hyp": "kept"} for row in rows}
    assert [row["hyp"] for row in run_long_clips(adapter, [long], planned, options=FAST, done=done)] == ["kept"] * 2


def test_eval_command_reports_long_rows_and_the_real_time_factor(whisper_dir, data, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, [
        "eval", "--model", str(whisper_dir), "--data", str(data / "manifest.jsonl"), "--methods", "full,stride",
        "--retention", "0.5", "--max-new-tokens", "6", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())
    rows = rows["clips"] if isinstance(rows, dict) else rows
    assert [(row["clip"], row["method"]) for row in rows] == [
        ("long40", "full"), ("long40", "stride"), ("short10", "full"), ("short10", "stride")
    ]
    long_rows = [row for row in rows if row["clip"] == "long40"]
    assert all(row["longform"] and row["windows"] >= 2 and row["real_time_factor"] > 0 for row in long_rows)
    assert all(not row.get("longform") for row in rows if row["clip"] == "short10")
    summary = json.loads((out / "summary.json").read_text())
    summary = summary["cells"] if isinstance(summary, dict) and "cells" in summary else summary
    assert all(cell["clips"] == 2 and cell["longform_clips"] == 1 and cell["real_time_factor"] > 0 for cell in summary)


def test_eval_still_refuses_long_clips_for_one_window_families(tmp_path, data):
    # the bundled decoder-only model takes one clip up to its limit: a longer clip is refused before it loads
    long = tmp_path / "manifest.jsonl"
    soundfile.write(str(tmp_path / "long.wav"), speechlike(700.0, 3), 16000)
    long.write_text(json.dumps({"id": "long", "audio": "long.wav", "text": "a"}) + "\n")
    result = runner.invoke(app, ["eval", "--model", "tiny", "--data", str(long), "--methods", "full", "--out",
                                 str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "longer than this model's limit" in result.output
