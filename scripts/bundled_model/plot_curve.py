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
    parser.add_argument("--metrics", type=Path, default=Path(".build/train/metrics.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("docs/bundled-model-training.png"))
    args = parser.parse_args()

    rows = [json.loads(line) for line in args.metrics.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "heldout_loss" not in r]
    evals = [r for r in rows if "heldout_loss" in r]
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["minutes"] for r in train], [r["train_loss"] for r in train], label="train loss (EMA, smoothed labels)")
    ax_loss.plot([r["minutes"] for r in evals], [r["heldout_loss"] for r in evals], "o-", label="held-out loss")
    ax_loss.set_xlabel("training minutes (2 shared CPU cores)")
    ax_loss.set_ylabel("cross-entropy per token")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    for key, label in (("wer_short", "WER < 10 s"), ("wer_long", "WER 20-30 s"), ("cer", "CER (all)")):
        ax_err.plot([r["minutes"] for r in evals], [min(r[key], 1.5) for r in evals], "o-", label=label)
    ax_err.set_xlabel("training minutes")
    ax_err.set_ylabel("greedy error rate on held-out subset (capped at 1.5)")
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
