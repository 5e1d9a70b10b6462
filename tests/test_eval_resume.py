"""`eval --resume` after a real kill -9: finished clip-cells are kept, the rest run, and the tables equal an
uninterrupted run's (every field but the measured seconds)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from audiokv_cli.evaluation.journal import JOURNAL_NAME, Journal
from tests.conftest import write_tone

ROOT = Path(__file__).resolve().parents[1]


def _comparable(rows):
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in rows]


def _eval(model, manifest, out, *more):
    return [sys.executable, "-m", "audiokv_cli", "eval", "--data", str(manifest), "--model", str(model),
            "--methods", "full,snapkv,h2o", "--retention", "0.5", "--max-new-tokens", "48", "--threads", "1",
            "--out", str(out), *more]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def _tables(stdout: str) -> str:
    return "\n".join(line for line in stdout.splitlines() if "│" in line or "┃" in line)


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(random_model_dir, tmp_path):
    lines = []
    for index in range(6):
        clip = write_tone(tmp_path / f"c{index}.wav", seconds=2.0 + 0.5 * index)
        lines.append(json.dumps({"audio": clip.name, "text": f"tone number {index}"}))
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")

    whole = subprocess.run(_eval(random_model_dir, manifest, tmp_path / "whole"), env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    journal = out / JOURNAL_NAME
    process = subprocess.Popen(_eval(random_model_dir, manifest, out), env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 5:  # header + at least 4 clip-cells
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert not (out / "summary.json").exists()
    done = len(Journal(out, {}).path.read_bytes().split(b"\n")) - 2  # complete rows: lines minus header and tail
    with open(journal, "ab") as handle:  # a write torn by the kill: half a row, no newline
        handle.write(b'{"clip": "c9", "method": "fu')

    resumed = subprocess.run(_eval(random_model_dir, manifest, out, "--resume"), env=_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {done} clip-cells already done" in " ".join(resumed.stderr.split())
    assert 4 <= done < 18
    assert not journal.exists()  # the report holds every row now

    for name, key in (("results.json", "clips"), ("summary.json", "cells")):
        first = json.loads((tmp_path / "whole" / name).read_text())[key]
        second = json.loads((out / name).read_text())[key]
        assert _comparable(second) == _comparable(first)
    assert _tables(resumed.stdout) == _tables(whole.stdout) != ""


def test_journal_refuses_rows_of_other_settings(tmp_path):
    first = Journal(tmp_path, {"max_new_tokens": 8})
    first.append({"clip": "a", "method": "full", "retention": 1.0, "scope": None, "hyp": "x"})
    assert Journal(tmp_path, {"max_new_tokens": 8}).read() == {("a", "full", 1.0, None): {
        "clip": "a", "method": "full", "retention": 1.0, "scope": None, "hyp": "x"}}
    from audiokv_cli.errors import AudiokvError

    with pytest.raises(AudiokvError, match="other settings"):
        Journal(tmp_path, {"max_new_tokens": 16}).read()
