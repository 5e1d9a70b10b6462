"""The byte frontier from scripts/frontier/sweep.sh's outputs: WER against kept bytes per family of settings.

    python scripts/frontier/table.py .build/frontier [--out docs/results/frontier] [--markdown]

For every (model, set) it reads each part's results.json, aggregates every cell (corpus WER: summed word edits over
summed reference words, the Whisper normalizer's words; degeneration rate; mean kept bytes as a fraction of the
16-bit cache), and for each byte budget 1/2 .. 1/64 picks, within each family, the best cell whose measured bytes fit:

- quantization alone: every entry kept at 16, 8, 4 or 2 bits (full@BITS);
- eviction alone: 16-bit entries, evicted ones dropped (METHOD@budget-16bit);
- eviction x bits: fewer bits, evicted entries dropped;
- merging: evicted entries folded into kept neighbours (METHOD:merge..., any bits);
- kvpress-style merging (values only), transformers' QuantizedCache (hf-quanto, decoder-only models) and the
  --kv-budget choice (METHOD@budget) where the sweep ran them; on Whisper the shipped choice keeps the encoder
  output once, and budget cells on the per-head cache (--cross-store kv) are their own family.

Writes frontier.json (every cell) and frontier.png (WER against bytes, one curve per family) under --out, and prints
the table (markdown with --markdown).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import jiwer

BUDGETS = [1 / 2, 1 / 4, 1 / 8, 1 / 10, 1 / 16, 1 / 20, 1 / 32, 1 / 40, 1 / 64]
AUTO = "--kv-budget (auto)"
PER_HEAD = "--kv-budget, per-head cache"
COLORS = {
    AUTO: "black", PER_HEAD: "tab:olive", "quantization alone": "tab:brown", "transformers QuantizedCache": "tab:pink",
    "eviction alone": "tab:orange", "eviction x bits": "tab:green", "merging": "tab:red",
    "merging x bits": "tab:purple", "kvpress merging (values)": "tab:gray",
}


def family(method: str, bits: int) -> str:
    base, _, storage = method.partition("@")
    if base.startswith("hf-"):
        return "transformers QuantizedCache"
    if base == "full":
        return "quantization alone" if storage else "full cache"
    if ":merge-values" in base:
        return "kvpress merging (values)"
    if storage == "budget":
        return AUTO
    merged = ":merge" in base
    if merged:
        return "merging" if bits >= 16 else "merging x bits"
    return "eviction alone" if bits >= 16 else "eviction x bits"


def load_cells(root: Path) -> dict:
    """{(model, set): [cell dicts]} from every results.json under root/MODEL/SET/PART/."""
    out: dict = defaultdict(list)
    for path in sorted(root.glob("*/*/*/results.json")):
        model, data_set = path.parts[-4], path.parts[-3]
        rows = json.loads(path.read_text())["clips"]
        by_cell: dict = defaultdict(list)
        for row in rows:
            by_cell[(row["method"], row["retention"], row.get("scope"))].append(row)
        for (method, budget, scope), cell_rows in by_cell.items():
            refs = [r["ref_normalized"] for r in cell_rows]
            hyps = [r["hyp_normalized"] for r in cell_rows]
            usable = [(r, h) for r, h in zip(refs, hyps) if r.strip()]
            wer = 100 * jiwer.wer([r for r, _ in usable], [h for _, h in usable]) if usable else math.nan
            bits = max(int(r["kv_bits"]) for r in cell_rows)
            out[(model, data_set)].append(
                {
                    "model": model,
                    "set": data_set,
                    "method": method,
                    "budget": budget if "@budget" in method else None,
                    "family": family(method, min(bits, 16)),
                    "bits": min(bits, 16) if "@" in method or bits <= 16 else bits,
                    "bytes": sum(r["kept_ratio_16bit"] for r in cell_rows) / len(cell_rows),
                    "retention": sum(r.get("retention_run", r["retention"]) for r in cell_rows) / len(cell_rows),
                    "wer": wer,
                    "degenerate": sum(bool(r["degenerate"]) for r in cell_rows) / len(cell_rows),
                    "empty": sum(not r["hyp_normalized"].strip() for r in cell_rows) / len(cell_rows),
                    "clips": len(cell_rows),
                    "cross_store": cell_rows[0].get("cross_store"),
                }
            )
    for cells in out.values():
        # Where Whisper's encoder output was kept once (the shipped --kv-budget), budget cells run on the per-head
        # cache (--cross-store kv) are a family of their own.
        if any(c["cross_store"] == "latent" for c in cells):
            for cell in cells:
                if cell["family"] == AUTO and cell["cross_store"] != "latent":
                    cell["family"] = PER_HEAD
    return out


def frontier_rows(cells: list[dict]) -> list[dict]:
    """Per budget and family: the lowest-WER cell whose measured bytes fit in the budget."""
    rows = []
    families = sorted({c["family"] for c in cells if c["family"] != "full cache"})
    for budget in BUDGETS:
        row = {"budget": budget}
        for name in families:
            if name in (AUTO, PER_HEAD):  # what --kv-budget gives at exactly this budget
                exact = [c for c in cells if c["family"] == name and c["budget"] and abs(c["budget"] - budget) < 1e-9]
                row[name] = exact[0] if exact else None
                continue
            fitting = [c for c in cells if c["family"] == name and c["bytes"] <= budget * 1.0001]
            row[name] = min(fitting, key=lambda c: (c["wer"], c["bytes"])) if fitting else None
        rows.append(row)
    return rows


def fraction(value: float) -> str:
    return f"1/{round(1 / value)}" if value < 1 else "1"


def print_table(key, cells, markdown: bool) -> None:
    full = next((c for c in cells if c["family"] == "full cache"), None)
    rows = frontier_rows(cells)
    families = [name for name in rows[0] if name != "budget"]
    title = f"{key[0]} on {key[1]} ({cells[0]['clips']} clips): WER % (degenerate clips), best setting that fits"
    if full:
        title += f"; full cache {full['wer']:.1f}"
    print(f"\n{title}\n")
    print("| budget | " + " | ".join(families) + " |")
    print("|---|" + "---:|" * len(families))
    for row in rows:
        parts = []
        for name in families:
            cell = row[name]
            if cell is None:
                parts.append("-")
                continue
            method = cell["method"].split("@")[0]
            setting = f"{method}, {cell['bits']}b, r={cell['retention']:.2f}, {cell['bytes']:.3f}"
            deg = f" ({100 * cell['degenerate']:.0f}% deg)" if cell["degenerate"] else ""
            parts.append(f"**{cell['wer']:.1f}**{deg} <sub>{setting}</sub>")
        print(f"| {fraction(row['budget'])} | " + " | ".join(parts) + " |")


def plot(all_cells: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(all_cells)
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.5), squeeze=False)
    for axis, key in zip(axes[0], keys):
        cells = all_cells[key]
        rows = frontier_rows(cells)
        for name in [n for n in rows[0] if n != "budget"]:
            points = sorted({(r[name]["bytes"], r[name]["wer"]) for r in rows if r[name] is not None})
            if points:
                axis.plot(
                    [p[0] for p in points], [min(p[1], 100) for p in points], marker="o", label=name,
                    color=COLORS.get(name),
                )
        full = next((c for c in cells if c["family"] == "full cache"), None)
        if full:
            axis.axhline(full["wer"], color="tab:blue", linestyle="--", linewidth=0.8, label="full cache")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("kept bytes / 16-bit cache")
        axis.set_ylabel("WER % (capped at 100)")
        axis.set_title(f"{key[0]}, {key[1]}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    all_cells = load_cells(args.root)
    if not all_cells:
        raise SystemExit(f"no results.json under {args.root}/MODEL/SET/PART/")
    for key in sorted(all_cells):
        print_table(key, all_cells[key], args.markdown)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        cells = [cell for key in sorted(all_cells) for cell in all_cells[key]]
        (args.out / "frontier.json").write_text(json.dumps(cells, indent=1) + "\n")
        plot(all_cells, args.out)
        print(f"\nwrote {args.out}/frontier.json and frontier.png")


if __name__ == "__main__":
    main()
