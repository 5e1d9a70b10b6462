"""Profile Whisper under the prompt long-form decoding uses, and compare its head ranking with a shipped profile.

`audiokv profile` decodes each probe clip after Whisper's one-clip prompt (`<|startoftranscript|><|en|>
<|transcribe|><|notimestamps|>`); long-form windows are decoded after the timestamp prompt (no `<|notimestamps|>`,
timestamp tokens between segments). This runs the same profiler with the timestamp prompt and reports how far the
two head rankings agree (Spearman's rho over all heads, overlap of the top heads, the budget each head gets).

    python scripts/longform/profile_timestamp_prompt.py --model whisper-base --data .build/probes-whisper \
        --shipped profiles/whisper-base.safetensors --out .build/s24/whisper-base-timestamps.safetensors
"""

from __future__ import annotations

import argparse
import json

import torch


def ranks(values: torch.Tensor) -> torch.Tensor:
    order = values.flatten().argsort()
    result = torch.empty_like(order, dtype=torch.float64)
    result[order] = torch.arange(order.numel(), dtype=torch.float64)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="whisper-base")
    parser.add_argument("--data", required=True)
    parser.add_argument("--shipped", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()

    from typer.testing import CliRunner

    from audiokv_cli.cli import app
    from audiokv_cli.models.families.whisper import WhisperAdapter
    from audiokv_cli.profiling.profile_file import load_profile

    shipped = load_profile(args.shipped)
    settings = shipped.provenance
    # The one change: every probe clip is prepared as a long-form window (timestamp prompt, no previous text).
    WhisperAdapter.prepare = lambda self, audio, prompt=None: self.prepare_window(audio, list(self.timestamp_prompt_ids))
    command = [
        "profile", "--model", args.model, "--data", args.data, "--out", args.out,
        "--top-k", str(settings["top_k"]), "--max-new-tokens", str(settings["max_new_tokens"]),
        "--aligner", settings["aligner"], "--no-sensitivity",
    ]
    result = CliRunner().invoke(app, command)
    if result.exit_code != 0:
        raise SystemExit(result.output)
    timestamped = load_profile(args.out)
    a, b = shipped.score.flatten(), timestamped.score.flatten()
    ra, rb = ranks(a), ranks(b)
    rho = float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])
    top_a = set(a.argsort(descending=True)[: args.top].tolist())
    top_b = set(b.argsort(descending=True)[: args.top].tolist())
    print(json.dumps({
        "heads": a.numel(),
        "spearman_rho": round(rho, 4),
        f"top{args.top}_overlap": len(top_a & top_b),
        "shipped_top": sorted(top_a),
        "timestamp_top": sorted(top_b),
        "scored_steps": [shipped.provenance.get("scored_steps"), timestamped.provenance.get("scored_steps")],
    }, indent=1))


if __name__ == "__main__":
    main()
