"""PNG heatmap of a head profile (matplotlib, headless)."""

from __future__ import annotations

import os
from pathlib import Path

from audiokv_cli.io.files import atomic_output


def write_heatmap_png(profile, path: str | os.PathLike) -> Path:
    """Layers as rows, query heads as columns, colored by score; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    score = profile.score.numpy()
    layers, heads = score.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.25 * heads, 16), min(1.5 + 0.22 * layers, 14)), dpi=120)
    image = ax.imshow(score, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    p = profile.provenance
    what = "top-K hits on the spoken word" if p["statistic"] == "topk_hits" else "attention mass on audio"
    ax.set_title(f"{profile.fingerprint.get('name_or_path')}: {what} (K={p['top_k']}, {p['clips']} clips)", fontsize=8)
    fig.colorbar(image, ax=ax, label="head score")
    fig.tight_layout()
    try:
        with atomic_output(path) as temp:
            fig.savefig(temp, format="png")
    finally:
        plt.close(fig)
    return path
