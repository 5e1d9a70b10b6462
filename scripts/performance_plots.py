"""Plots for docs/performance.md from `audiokv bench --json` rows: decode time and peak KV against prompt length.

    python scripts/performance_plots.py docs/results/performance/*.json --out docs
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def label(row: dict) -> str:
    name = "full" if row["method"] == "full" else f"{row['method']} @ {row['retention']:g}"
    return f"{name}, chunked prefill" if row.get("prefill_chunk") else name


def main(argv: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    rows = [json.loads(line) for path in args.rows for line in path.read_text().splitlines() if line.startswith("{")]
    rows = [row for row in rows if "kernel" not in row]  # whole-model rows only
    # Best (lowest) time per series and length over the files given: the runs were repeated on a shared machine.
    decode, peak, kept = defaultdict(dict), defaultdict(dict), defaultdict(dict)
    for row in rows:
        series, length = label(row), row["prompt_tokens"]
        if not row.get("prefill_chunk") and row["new_tokens"] >= 16:
            decode[series][length] = min(decode[series].get(length, float("inf")), row["ms_per_token"])
        peak[series][length] = row["peak_prefill_cache_bytes"] / 2**20
        kept[series][length] = row["kv_bytes_kept"] / 2**20

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for series, points in sorted(decode.items()):
        xs = sorted(points)
        left.plot(xs, [points[x] for x in xs], marker="o", label=series)
    left.set(xlabel="prompt tokens", ylabel="decode ms / token", title="Decode time (bundled model, CPU, 1 thread)")
    left.grid(alpha=0.3)
    left.legend()
    for series, points in sorted(peak.items()):
        xs = sorted(points)
        right.plot(xs, [points[x] for x in xs], marker="o", label=f"peak during prefill: {series}")
    full = kept.get("full", {})
    if full:
        xs = sorted(full)
        right.plot(xs, [full[x] for x in xs], linestyle=":", color="gray", label="full cache after prefill")
    right.set(xlabel="prompt tokens", ylabel="KV cache MiB", title="Peak KV cache during prefill")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    figure.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out / "performance.png", dpi=110)
    print(args.out / "performance.png")


if __name__ == "__main__":
    main()
