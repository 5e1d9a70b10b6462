"""Plot the training curve of the bundled model from ``metrics.jsonl`` (train.py) into a PNG and print a table.

Usage: python scripts/bundled_model/plot_curve.py --metrics .build/train/metrics.jsonl \\
           --out docs/bundled-model-training.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", action="append", default=None,
                        help="PATH[,OFFSET_MIN[,UNTIL_MIN]] (repeatable): a run continued from another run's checkpoint "
                             "is drawn after it, shifted by OFFSET_MIN; rows after UNTIL_MIN are dropped")
    parser.add_argument("--out", type=Path, default=Path("docs/bundled-model-training.png"))
    args = parser.parse_args()

    rows = []
    for spec in args.metrics or [".build/train/metrics.jsonl"]:
        path, *rest = spec.split(",")
        offset = float(rest[0]) if rest else 0.0
        until = float(rest[1]) if len(rest) > 1 else float("inf")
        for line in Path(path).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row["minutes"] <= until:
                    row["minutes"] += offset
                    row["phase"] = path
                    rows.append(row)
    train = [r for r in rows if "heldout_loss" not in r]
    evals = [r for r in rows if "heldout_loss" in r]
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
    phases = list(dict.fromkeys(r["phase"] for r in rows))
    for n, phase in enumerate(phases, start=1):
        part = [r for r in train if r["phase"] == phase]
        label = "train loss (EMA)" if len(phases) == 1 else f"train loss, stage {n} (EMA)"
        ax_loss.plot([r["minutes"] for r in part], [r["train_loss"] for r in part], label=label)
        if n > 1 and part:
            for ax in (ax_loss, ax_err):
                ax.axvline(min(r["minutes"] for r in rows if r["phase"] == phase), color="grey", ls=":", lw=1)
    ax_loss.plot([r["minutes"] for r in evals], [r["heldout_loss"] for r in evals], "o-", label="held-out loss")
    ax_loss.set_xlabel("training minutes (2 shared CPU cores)")
    ax_loss.set_ylabel("cross-entropy per token")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    for key, label in (("wer_short", "WER < 10 s"), ("wer_long", "WER 20-30 s"), ("cer", "CER (all)")):
        ax_err.plot([r["minutes"] for r in evals], [min(r[key], 1.5) for r in evals], "o-", label=label)
    ax_err.set_xlabel("training minutes")
    ax_err.set_ylabel("greedy error rate, 12-16 held-out clips (cap 1.5)")
    ax_err.legend()
    ax_err.grid(alpha=0.3)
    fig.suptitle("audiokv bundled tiny model: training curve")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print("| minutes | step | clips seen | train loss | held-out loss | CER | WER < 10 s | WER 20-30 s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in evals:
        print(f"| {r['minutes']:.0f} | {r['step']} | {r['clips_seen']} | {r['train_loss']:.2f} | "
              f"{r['heldout_loss']:.2f} | {r['cer']:.2f} | {r['wer_short']:.2f} | {r['wer_long']:.2f} |")


if __name__ == "__main__":
    main()
