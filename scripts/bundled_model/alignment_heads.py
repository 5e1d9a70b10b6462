"""Which decoder heads follow the audio: for one held-out clip, per layer and head, the attention mass that the
transcript positions put on the audio and the correlation between the decoding step and the position of the
head's attention peak in the audio (near 1 = the head reads the audio in order, an alignment head).

Teacher-forced on the clip's reference transcript, eager attention, cached tower outputs from prepare_data.py.

Usage: python scripts/bundled_model/alignment_heads.py .build/stage3/final [--data .build/data]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train import Examples, Shards, collate  # noqa: E402


def main() -> None:
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, default=Path(".build/data"))
    parser.add_argument("--min-seconds", type=float, default=8.0)
    parser.add_argument("--max-seconds", type=float, default=14.0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    tokenizer = AutoProcessor.from_pretrained(args.checkpoint).tokenizer
    model = Qwen2AudioForConditionalGeneration.from_pretrained(args.checkpoint, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    heldout = Examples(Shards(args.data, "heldout"), tokenizer)
    clip = next(k for k, m in enumerate(heldout.shards.metas) if args.min_seconds < m["seconds"] < args.max_seconds)
    with torch.no_grad():
        # the training sequence of the clip, without augmentation
        inputs, _, _ = collate(model, heldout, [clip], False, random.Random(0), 0.0)
        out = model.model.language_model(inputs_embeds=inputs, output_attentions=True)
    n_audio, n_target, length = heldout.shards.metas[clip]["n_tokens"], len(heldout.targets[clip]), inputs.shape[1]
    print(f"clip {clip}: {heldout.shards.metas[clip]['seconds']:.1f} s, {n_audio} audio tokens, {n_target} targets")
    steps = np.arange(n_target)
    for layer, attn in enumerate(out.attentions):
        # rows that predict the transcript tokens, columns of the audio tokens (sequence index 1 .. n_audio)
        on_audio = attn[0, :, length - n_target - 1 : length - 1, 1 : 1 + n_audio]
        mass = on_audio.sum(-1).mean(-1)
        peaks = on_audio.argmax(-1).numpy()
        corr = [float(np.corrcoef(steps, p)[0, 1]) if p.std() > 0 else 0.0 for p in peaks]
        print(f"layer {layer} audio mass " + " ".join(f"{m:.2f}" for m in mass.tolist())
              + " | peak-vs-step correlation " + " ".join(f"{c:+.2f}" for c in corr))


if __name__ == "__main__":
    main()
