"""Does the trained ``small`` model use the audio? Held-out transcript loss with each clip's own audio against the
same transcripts with another clip's audio of similar length (and with the audio tokens zeroed).

A model that listens scores its own audio far better; one that writes from its language prior scores all three
alike. Prints the three mean losses (nats per transcript token).

Usage: python scripts/small_model/listening_check.py --checkpoint .build/small-train/last --clips 40
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location("small_train", Path(__file__).with_name("train.py"))
small_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(small_train)

from audiokv_cli.models.assets.small_model import build_processor, load_smollm2  # noqa: E402


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path(".build/small-train/last"))
    parser.add_argument("--data", type=Path, default=Path(".build/small-data"))
    parser.add_argument("--clips", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(2)

    llm, tokenizer = load_smollm2()
    processor = build_processor(tokenizer)
    parts = small_train.Trainable(small_train.build_tower("base"), 4, llm.config.hidden_size, 16, llm)
    llm = small_train.add_lora(llm, 16)
    small_train.load_trainable(args.checkpoint, parts, llm)
    parts.eval(), llm.eval()
    prompt = small_train.Prompt(processor)
    heldout = small_train.Shards(args.data, "heldout")
    order = sorted(range(len(heldout.metas)), key=lambda i: heldout.metas[i]["n_tokens"])[: args.clips]
    embed = llm.get_input_embeddings()
    totals = {"own audio": 0.0, "other clip's audio": 0.0, "zeroed audio": 0.0}
    for rank, i in enumerate(order):
        other = order[rank - 1] if rank else order[1]
        inputs, mask, labels, _, _, _ = small_train.build_inputs(parts, embed, prompt, heldout, [i], 0.0)
        totals["own audio"] += float(llm(inputs_embeds=inputs, attention_mask=mask, labels=labels).loss)
        # the other clip's audio tokens, cut or repeated to this clip's count, in this clip's sequence
        own = parts.audio_tokens(small_train.frames_of(heldout, i)[None])[0]
        swap = parts.audio_tokens(small_train.frames_of(heldout, other)[None])[0]
        swap = swap.repeat((own.shape[0] // swap.shape[0]) + 1, 1)[: own.shape[0]]
        start = len(prompt.before) + 1
        for name, tokens in (("other clip's audio", swap), ("zeroed audio", torch.zeros_like(own))):
            changed = inputs.clone()
            changed[0, start : start + own.shape[0]] = tokens
            totals[name] += float(llm(inputs_embeds=changed, attention_mask=mask, labels=labels).loss)
    for name, total in totals.items():
        print(f"{name:>20}: {total / len(order):.3f} nats per token ({len(order)} held-out clips)")


if __name__ == "__main__":
    main()
