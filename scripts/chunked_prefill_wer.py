"""WER of chunked prefill (`--prefill-chunk N`) against one-shot compression, same clips, methods and retention.

Each clip is decoded greedily three ways per method: one-shot prefill then compression (the default), and chunked
prefill with every layer compressed to its budget after each chunk of N tokens, for each N given. Corpus WER with
Whisper's English normalizer; also how many clips' transcripts differ from the one-shot ones.

Usage: python scripts/chunked_prefill_wer.py --model tiny --data .build/eval-set --limit 30 --chunks 256,128
"""

from __future__ import annotations

import argparse
import json

import torch

from audiokv_cli.io.audio import load_audio
from audiokv_cli.commands.infer import resolve_head_scores
from audiokv_cli.compression.methods import MethodOptions, build_policy
from audiokv_cli.evaluation.datasets import read_manifest
from audiokv_cli.evaluation.metrics import corpus_wer
from audiokv_cli.runtime.inference import run_clip
from audiokv_cli.models import load_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--data", default=".build/eval-set")
    parser.add_argument("--limit", type=int, default=30)
    parser.add_argument("--methods", default="snapkv,audiokv")
    parser.add_argument("--retention", type=float, default=0.4)
    parser.add_argument("--chunks", default="256,128")
    parser.add_argument("--max-new-tokens", type=int, default=384)
    args = parser.parse_args()
    torch.set_num_threads(2)

    adapter = load_adapter(args.model, device="cpu", dtype="float32")
    examples = list(read_manifest(f"{args.data}/manifest.jsonl"))[: args.limit]
    audio = [load_audio(example.audio_path) for example in examples]
    references = [example.text for example in examples]
    chunks = [int(c) for c in args.chunks.split(",")]
    rows = []
    for method in args.methods.split(","):
        options = MethodOptions(head_scores=resolve_head_scores(adapter, None) if method == "audiokv" else None)
        policy = build_policy(method, args.retention, options)
        one_shot = [run_clip(adapter, a, policy, max_new_tokens=args.max_new_tokens).text for a in audio]
        rows.append({"method": method, "prefill": "one-shot", "wer": corpus_wer(references, one_shot)})
        for chunk in chunks:
            texts = [
                run_clip(adapter, a, policy, max_new_tokens=args.max_new_tokens, prefill_chunk=chunk).text
                for a in audio
            ]
            changed = sum(t != o for t, o in zip(texts, one_shot))
            rows.append({"method": method, "prefill": f"chunks of {chunk}", "wer": corpus_wer(references, texts),
                         "clips_changed": changed})
    prompt_tokens = [adapter.prepare(a).prompt_tokens for a in audio]
    print(json.dumps({"clips": len(examples), "prompt_tokens": [min(prompt_tokens), max(prompt_tokens)],
                      "retention": args.retention}))
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
