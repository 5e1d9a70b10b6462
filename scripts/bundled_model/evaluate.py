"""Greedy-decoding WER of a model folder (normally the shipped ``audiokv_cli/assets/tiny``) on manifests.

Runs exactly the inference path users get: ``AutoProcessor`` + ``Qwen2AudioForConditionalGeneration.generate``
with the base ASR prompt, greedy, full KV cache. Scoring follows the audio-LM convention: Whisper's English text
normalizer on both sides, corpus-level WER (sum of edits / sum of reference words), CER alongside. A hypothesis
more than 1.5x the reference word count is counted as a runaway (repetition loop).

Usage:
  python scripts/bundled_model/evaluate.py --model audiokv_cli/assets/tiny \\
      --manifest short=.build/eval-short/manifest.jsonl --manifest long=.build/eval-long/manifest.jsonl \\
      --out .build/eval-results.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).parent))
from text_side import ASR_PROMPT  # noqa: E402


def load_manifest(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in rows:
        row["path"] = str(path.parent / row["audio"])
    return rows


@torch.inference_mode()
def transcribe(model, processor, audio: np.ndarray) -> str:
    inputs = processor(text=ASR_PROMPT, audio=audio, sampling_rate=16000, return_tensors="pt")
    max_new = int(len(audio) / 16000 * 8) + 10
    out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def score(refs: list[str], hyps: list[str]) -> dict:
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    norm = EnglishTextNormalizer()
    pairs = [(norm(r), norm(h)) for r, h in zip(refs, hyps)]
    pairs = [(r, h) for r, h in pairs if r.strip()]
    refs_n = [r for r, _ in pairs]
    hyps_n = [h if h.strip() else "<empty>" for _, h in pairs]
    measures = jiwer.process_words(refs_n, hyps_n)
    edits = measures.substitutions + measures.deletions + measures.insertions
    n_ref = sum(len(r.split()) for r in refs_n)
    runaways = sum(len(h.split()) > 1.5 * len(r.split()) + 3 for r, h in pairs)
    return {
        "clips": len(pairs),
        "wer": edits / max(1, n_ref),
        "cer": jiwer.cer(refs_n, hyps_n),
        "substitutions": measures.substitutions,
        "deletions": measures.deletions,
        "insertions": measures.insertions,
        "reference_words": n_ref,
        "runaway_clips": runaways,
    }


def main() -> None:
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("audiokv_cli/assets/tiny"))
    parser.add_argument("--manifest", action="append", required=True, help="NAME=PATH (repeatable)")
    parser.add_argument("--out", type=Path, default=Path(".build/eval-results.json"))
    parser.add_argument("--limit", type=int, default=0, help="first N clips of each manifest (0 = all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = Qwen2AudioForConditionalGeneration.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    results = {"model": str(args.model), "dtype": str(next(model.parameters()).dtype), "sets": {}}
    for spec in args.manifest:
        name, _, path = spec.partition("=")
        rows = load_manifest(Path(path))
        if args.limit:
            rows = rows[: args.limit]
        refs, hyps, seconds, details = [], [], [], []
        start = time.time()
        for row in rows:
            audio, sr = sf.read(row["path"], dtype="float32")
            assert sr == 16000 and audio.ndim == 1, f"{row['path']}: expected 16 kHz mono"
            hyp = transcribe(model, processor, audio)
            refs.append(row["text"])
            hyps.append(hyp)
            seconds.append(len(audio) / 16000)
            details.append({"audio": row["audio"], "ref": row["text"], "hyp": hyp})
        summary = score(refs, hyps)
        summary.update(manifest=path, mean_seconds=float(np.mean(seconds)), min_seconds=float(np.min(seconds)),
                       max_seconds=float(np.max(seconds)), decode_seconds=time.time() - start)
        results["sets"][name] = summary
        print(f"{name}: {summary['clips']} clips ({summary['min_seconds']:.1f}-{summary['max_seconds']:.1f} s), "
              f"WER {summary['wer']:.3f}, CER {summary['cer']:.3f}, runaways {summary['runaway_clips']}", flush=True)
        detail_path = args.out.with_name(f"{args.out.stem}-{name}.jsonl")
        tmp = detail_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(d) + "\n" for d in details))
        os.replace(tmp, detail_path)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
