import csv
import json
import math
import os

import pytest

from audiokv_cli.io import files
from audiokv_cli.io.files import OutputError
from PIL import Image
from rich.console import Console

from audiokv_cli.evaluation import report
from audiokv_cli.evaluation.report import (
    PLOT_PNG,
    RESULTS_CSV,
    RESULTS_JSON,
    SUMMARY_CSV,
    SUMMARY_JSON,
    ReportError,
    markdown_table,
    table1,
    write_json,
    write_report,
)


def cell(method, retention, scope, wer, degeneration=0.0):
    return {
        "method": method,
        "retention": retention,
        "scope": scope,
        "clips": 2,
        "wer": wer,
        "error_rate": wer,
        "accuracy": max(0.0, 100.0 - 100.0 * wer),
        "degeneration_rate": degeneration,
        "mean_kept_ratio": retention,
    }


@pytest.fixture
def summary():
    rows = [cell("full", 1.0, None, 0.02)]
    for scope in ("audio", "all"):
        grid = ((0.8, 0.03, 0.10, 0.0), (0.6, 0.04, 0.60, 0.5), (0.4, 0.05, 1.2, 1.0))
        for retention, audiokv, snapkv, degenerate in grid:
            rows.append(cell("audiokv", retention, scope, audiokv))
            rows.append(cell("snapkv", retention, scope, snapkv, degenerate))
    return rows


@pytest.fixture
def clips():
    return [
        {"id": "a", "method": "audiokv", "retention": 0.4, "scope": "audio", "ref": "hello", "hyp": "hello",
         "wer": 0.0, "seconds_decode": 0.1, "token_ids": [1, 2]},
        {"id": "b", "method": "audiokv", "retention": 0.4, "scope": "audio", "ref": "bye, \"now\"", "hyp": "bye",
         "wer": 0.5, "seconds_decode": math.nan},
    ]


def test_write_report_writes_every_file(tmp_path, summary, clips):
    out = tmp_path / "run"
    paths = write_report(out, clips, summary, metadata={"model": "tiny"})
    assert set(paths) == {RESULTS_CSV, RESULTS_JSON, SUMMARY_CSV, SUMMARY_JSON, PLOT_PNG}
    assert all(path.is_file() and path.stat().st_size > 0 for path in paths.values())
    assert sorted(os.listdir(out)) == sorted(paths)  # no temporary files left behind

    results = json.loads((out / RESULTS_JSON).read_text())
    assert results["metadata"] == {"model": "tiny"}
    assert [clip["id"] for clip in results["clips"]] == ["a", "b"]
    assert results["clips"][1]["seconds_decode"] is None  # NaN is not valid JSON

    with open(out / RESULTS_CSV, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["id"] for row in rows] == ["a", "b"]
    assert rows[1]["ref"] == 'bye, "now"'
    assert json.loads(rows[0]["token_ids"]) == [1, 2]
    assert rows[1]["token_ids"] == "" and rows[1]["seconds_decode"] == ""

    cells = json.loads((out / SUMMARY_JSON).read_text())["cells"]
    assert len(cells) == len(summary) and cells[0]["method"] == "full"
    with open(out / SUMMARY_CSV, newline="") as handle:
        summary_rows = list(csv.DictReader(handle))
    assert len(summary_rows) == len(summary)
    assert float(summary_rows[-1]["wer"]) == pytest.approx(1.2)


def test_plot_is_a_valid_png(tmp_path, summary, clips):
    write_report(tmp_path, clips, summary)
    png = tmp_path / PLOT_PNG
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        width, height = image.size
    assert width > height > 100  # two scope panels side by side


def test_plot_with_only_full_cache(tmp_path):
    report.plot_retention([cell("full", 1.0, None, 0.02)], tmp_path / "only_full.png", metric="wer")
    with Image.open(tmp_path / "only_full.png") as image:
        image.verify()


def test_write_report_refuses_empty_summary(tmp_path):
    with pytest.raises(ReportError):
        write_report(tmp_path, [], [])
    with pytest.raises(ValueError, match="retention"):
        write_report(tmp_path, [], [{"method": "snapkv", "scope": "audio"}])


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    write_json(target, {"version": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(OutputError, match="disk full"):
        write_json(target, {"version": 2})
    assert json.loads(target.read_text()) == {"version": 1}
    assert os.listdir(tmp_path) == ["summary.json"]


def render(table) -> str:
    console = Console(record=True, width=160, color_system=None)
    console.print(table)
    return console.export_text()


def test_table1_layout(summary):
    text = render(table1(summary, scope="audio"))
    lines = text.splitlines()
    header = next(line for line in lines if "method" in line)
    assert header.index("0.8") < header.index("0.6") < header.index("0.4")  # the paper's column order
    full = next(line for line in lines if "full cache" in line)
    assert full.count("2.0") == 3  # the full-cache figure under every retention
    snapkv = next(line for line in lines if "snapkv" in line)
    assert "10.0" in snapkv and "60.0 50% deg" in snapkv and "120.0 100% deg" in snapkv
    audiokv = next(line for line in lines if "audiokv" in line)
    assert "deg" not in audiokv
    order = [name for name in ("full cache", "audiokv", "snapkv") for line in lines if name in line]
    assert order == ["full cache", "audiokv", "snapkv"]


def test_table1_labels_scopes_when_mixed(summary):
    text = render(table1(summary, metric="accuracy"))
    assert "audiokv (audio)" in text and "snapkv (all)" in text
    assert "97.0" in text  # audiokv accuracy at 0.8


def test_markdown_table(summary):
    subset = [row for row in summary if row["scope"] in (None, "audio") and row["retention"] in (1.0, 0.8, 0.4)]
    assert markdown_table(subset) == (
        "| method | WER (%) @ 0.8 | WER (%) @ 0.4 |\n"
        "|---|---:|---:|\n"
        "| full cache | 2.0 | 2.0 |\n"
        "| audiokv | 3.0 | 5.0 |\n"
        "| snapkv | 10.0 | 120.0 (100% deg) |\n"
    )


def test_table_missing_cell_and_errors(summary):
    partial = [row for row in summary if not (row["method"] == "audiokv" and row["retention"] == 0.4)]
    assert "| audiokv | 3.0 | 4.0 | - |" in markdown_table(partial, scope="audio")
    with pytest.raises(ValueError, match="scope"):
        markdown_table(summary, scope="text")
    with pytest.raises(ValueError, match="metric"):
        markdown_table(summary, metric="bleu")
    with pytest.raises(ValueError, match="two summary rows"):
        markdown_table(summary + [cell("audiokv", 0.8, "audio", 0.5)], scope="audio")
