"""Evaluation outputs: per-clip and per-cell CSV/JSON, the error-vs-retention plot, and Table 1 style tables.

A *cell* is one (method, retention, scope) combination; its summary row is the cell's keys plus the fields of
metrics.aggregate(). The full-cache baseline is the cell whose method is FULL_METHOD; its retention is ignored and
an empty/None scope means it applies to every scope. Every file is written to a temporary file in the output
directory first and moved into place, so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audiokv_cli.errors import AudiokvError
from audiokv_cli.io.files import write_atomic, write_together

FULL_METHOD = "full"
CELL_KEYS = ("method", "retention", "scope")

RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
SUMMARY_CSV = "summary.csv"
SUMMARY_JSON = "summary.json"
PLOT_PNG = "wer_vs_retention.png"

# How each metric is shown: summary key, label, scale to percent.
METRICS = {
    "wer": ("wer", "WER (%)", 100.0),
    "cer": ("cer", "CER (%)", 100.0),
    "error_rate": ("error_rate", "error rate (%)", 100.0),
    "accuracy": ("accuracy", "accuracy (%)", 1.0),
}


class ReportError(AudiokvError):
    """The report cannot be written (unwritable output directory, nothing to report)."""


# ---------------------------------------------------------------------------------------------- atomic writing


def _plain(value: Any) -> Any:
    """A JSON-safe copy: NaN/inf -> None, paths -> str, tuples -> lists, other unknown objects -> str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return _plain(value.tolist())
    return str(value)


def json_bytes(data: Any) -> bytes:
    """``data`` as indented JSON (NaN becomes null)."""
    return (json.dumps(_plain(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON (NaN becomes null), atomically."""
    write_atomic(Path(path), json_bytes(data))


def write_csv(path: str | Path, rows: Sequence[Mapping]) -> None:
    """Write rows as CSV (see ``csv_bytes``), atomically."""
    write_atomic(Path(path), csv_bytes(rows))


def csv_bytes(rows: Sequence[Mapping]) -> bytes:
    """Rows as CSV. Columns: every key, in order of first appearance; missing or NaN values are empty; lists and
    dicts are JSON-encoded."""
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        cells = {}
        for key in columns:
            value = _plain(row.get(key))
            if isinstance(value, (list, dict)):
                value = json.dumps(value, ensure_ascii=False)
            cells[key] = "" if value is None else value
        writer.writerow(cells)
    return buffer.getvalue().encode("utf-8")


# ------------------------------------------------------------------------------------------------------- cells


def _is_full(row: Mapping) -> bool:
    return row.get("method") == FULL_METHOD


def _scopes(summary: Sequence[Mapping]) -> list[str]:
    scopes: list[str] = []
    for row in summary:
        scope = row.get("scope")
        if not _is_full(row) and scope and scope not in scopes:
            scopes.append(scope)
    return scopes


def _full_rows(summary: Sequence[Mapping], scope: str | None) -> list[Mapping]:
    return [row for row in summary if _is_full(row) and (not row.get("scope") or row.get("scope") == scope)]


def _metric(metric: str) -> tuple[str, str, float]:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    return METRICS[metric]


def _value(row: Mapping, metric: str) -> float:
    key, _, scale = _metric(metric)
    value = row.get(key)
    return math.nan if value is None else float(value) * scale


def _format_value(row: Mapping, metric: str) -> tuple[str, str]:
    """(number, degeneration marker) for one cell, e.g. ("45.1", "20% deg") or ("2.3", "")."""
    value = _value(row, metric)
    number = "n/a" if math.isnan(value) else f"{value:.1f}"
    rate = row.get("degeneration_rate")
    rate = math.nan if rate is None else float(rate)
    marker = f"{100.0 * rate:.0f}% deg" if rate > 0 else ""  # NaN > 0 is False
    return number, marker


@dataclass(frozen=True)
class _TableRow:
    label: str
    cells: Mapping[float, Mapping]  # retention -> summary row
    full: Mapping | None = None  # the full-cache row, shown in every column

    def cell(self, retention: float, metric: str) -> tuple[str, str]:
        row = self.full if self.full is not None else self.cells.get(retention)
        return ("-", "") if row is None else _format_value(row, metric)


def _table_layout(summary: Sequence[Mapping], metric: str, scope: str | None) -> tuple[list[float], list[_TableRow]]:
    """Columns (retentions, high to low) and rows (full cache first, then methods in order of appearance)."""
    _metric(metric)
    scopes = _scopes(summary)
    if scope is not None and scope not in scopes:
        raise ValueError(f"no cells with scope {scope!r}; scopes: {', '.join(scopes) or 'none'}")
    wanted = [scope] if scope is not None else scopes
    show_scope = len(wanted) > 1

    def included(row: Mapping) -> bool:
        # Rows without a scope (quantization alone: every entry kept) belong to every scope's table.
        return not wanted or not row.get("scope") or row.get("scope") in wanted

    retentions = sorted({float(row["retention"]) for row in summary if not _is_full(row) and included(row)})
    retentions.reverse()
    rows = [
        _TableRow("full cache" + (f" ({full['scope']})" if full.get("scope") and show_scope else ""), {}, full)
        for full in summary
        if _is_full(full) and (scope is None or not full.get("scope") or full.get("scope") == scope)
    ]
    by_label: dict[str, dict[float, Mapping]] = {}
    for row in summary:
        if _is_full(row) or not included(row):
            continue
        label = str(row["method"]) + (f" ({row['scope']})" if show_scope else "")
        cells = by_label.setdefault(label, {})
        retention = float(row["retention"])
        if retention in cells:
            raise ValueError(f"two summary rows for {label} at retention {row['retention']}")
        cells[retention] = row
    rows.extend(_TableRow(label, cells) for label, cells in by_label.items())
    return retentions, rows


def table1(summary: Sequence[Mapping], metric: str = "wer", scope: str | None = None, title: str | None = None):
    """A rich Table shaped like the paper's Table 1: one row per method (full cache first), one column per
    retention (high to low), cells = the metric in percent with the degeneration rate flagged ("20% deg").
    With several scopes and ``scope=None`` the rows are method (scope)."""
    from rich.table import Table
    from rich.text import Text

    retentions, rows = _table_layout(summary, metric, scope)
    _, label, _ = _metric(metric)
    table = Table(title=title or f"{label} by retention", title_justify="left")
    table.add_column("method")
    for retention in retentions:
        table.add_column(f"{retention:g}", justify="right")
    for row in rows:
        cells = []
        for retention in retentions:
            number, marker = row.cell(retention, metric)
            text = Text(number)
            if marker:
                text.append(f" {marker}", style="red")
            cells.append(text)
        table.add_row(row.label, *cells, style="dim" if row.full is not None else None)
    return table


def markdown_table(summary: Sequence[Mapping], metric: str = "wer", scope: str | None = None) -> str:
    """The table1() layout as a GitHub markdown table (cells like "45.1 (20% deg)")."""
    retentions, rows = _table_layout(summary, metric, scope)
    _, label, _ = _metric(metric)
    lines = [
        "| method | " + " | ".join(f"{label} @ {retention:g}" for retention in retentions) + " |",
        "|---|" + "---:|" * len(retentions),
    ]
    for row in rows:
        cells = []
        for retention in retentions:
            number, marker = row.cell(retention, metric)
            cells.append(f"{number} ({marker})" if marker else number)
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------------- plot


def plot_retention(summary: Sequence[Mapping], path: str | Path, metric: str = "accuracy") -> None:
    """Save ``plot_bytes`` as a PNG file, atomically."""
    write_atomic(Path(path), plot_bytes(summary, metric))


def plot_bytes(summary: Sequence[Mapping], metric: str = "accuracy") -> bytes:
    """A PNG of ``metric`` against retention: one panel per scope, one line per method, the full cache as a dashed
    horizontal line. Uses matplotlib's Agg canvas directly (no pyplot, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _, label, _ = _metric(metric)
    scopes = _scopes(summary) or [None]
    figure = Figure(figsize=(4.5 * len(scopes) + 1.0, 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(scopes), sharey=True, squeeze=False)[0]
    # One color per method across all panels, in order of first appearance.
    colors: dict[str, str] = {}
    for row in summary:
        if not _is_full(row):
            colors.setdefault(str(row["method"]), f"C{len(colors) % 10}")
    for axis, scope in zip(axes, scopes):
        methods: dict[str, list[tuple[float, float]]] = {}
        for row in summary:
            if _is_full(row) or (scope is not None and row.get("scope") != scope):
                continue
            methods.setdefault(str(row["method"]), []).append((float(row["retention"]), _value(row, metric)))
        for method, points in methods.items():
            points.sort()
            axis.plot([x for x, _ in points], [y for _, y in points], marker="o", color=colors[method], label=method)
        for full in _full_rows(summary, scope):
            axis.axhline(_value(full, metric), color="black", linestyle="--", linewidth=1, label="full cache")
        axis.set_title(f"scope: {scope}" if scope else "all cells")
        axis.set_xlabel("retention (fraction of prompt KV kept)")
        axis.grid(True, alpha=0.3)
        if methods or _full_rows(summary, scope):
            axis.legend(fontsize="small")
    axes[0].set_ylabel(label)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------------ report


def write_report(
    out_dir: str | Path,
    clips: Sequence[Mapping],
    summary: Sequence[Mapping],
    *,
    metadata: Mapping | None = None,
    plot_metric: str = "accuracy",
) -> dict[str, Path]:
    """Write results.csv/json (one row per clip), summary.csv/json (one row per cell) and wer_vs_retention.png
    under ``out_dir``; returns {file name: path}. ``metadata`` (model fingerprint, settings...) goes into both
    JSON files as {"metadata": ..., "clips"/"cells": [...]}."""
    if not summary:
        raise ReportError("nothing to report: no evaluation cells")
    for position, row in enumerate(summary):
        missing = [key for key in CELL_KEYS if key not in row]
        if missing:
            raise ValueError(f"summary row {position} lacks {', '.join(missing)}")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ReportError(f"{out}: cannot create output directory ({error.strerror or error})") from None
    paths = {name: out / name for name in (RESULTS_CSV, RESULTS_JSON, SUMMARY_CSV, SUMMARY_JSON, PLOT_PNG)}
    meta = dict(metadata or {})
    # All five staged before any replaces its predecessor: a failure leaves the previous report whole.
    write_together(
        {
            paths[RESULTS_CSV]: csv_bytes(clips),
            paths[RESULTS_JSON]: json_bytes({"metadata": meta, "clips": list(clips)}),
            paths[SUMMARY_CSV]: csv_bytes(summary),
            paths[SUMMARY_JSON]: json_bytes({"metadata": meta, "cells": list(summary)}),
            paths[PLOT_PNG]: plot_bytes(summary, plot_metric),
        }
    )
    return paths
