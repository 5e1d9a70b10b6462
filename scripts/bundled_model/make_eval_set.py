"""Synthesize a held-out English evaluation set for the bundled model.

Texts come only from held-out documents and voices only from held-out voice settings (``corpus.build_corpus`` and
``speech.is_heldout_voice``, the same split the training data generator uses), so no clip shares a sentence or a
voice setting with training. Clips are clean (no augmentation). Seeded: the same seed and installed files give
the same set.

Writes ``<out>/clips/NNNN.wav`` (16 kHz mono PCM) and ``<out>/manifest.jsonl`` with one line per clip:
``{"audio": "clips/NNNN.wav", "text": "<spoken text>", "lang": "en"}``.

Usage:
  python scripts/bundled_model/make_eval_set.py --out .build/eval-long --num 80                    # 20-30 s clips
  python scripts/bundled_model/make_eval_set.py --out .build/eval-short --num 100 --min-seconds 2 --max-seconds 10
  python scripts/bundled_model/make_eval_set.py --out .build/dev-long --split train --num 12 --seed 11
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import soundfile as sf

sys.path.insert(0, str(Path(__file__).parent))
from prepare_data import corpus_cached, plan_jobs, speak_within_limit  # noqa: E402
from speech import SAMPLE_RATE, VoiceSetting, is_heldout_voice  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num", type=int, default=80)
    parser.add_argument("--min-seconds", type=float, default=20.0)
    parser.add_argument("--max-seconds", type=float, default=29.5)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--split", choices=("heldout", "train"), default="heldout",
                        help="texts and voices from the held-out side (evaluation) or the training side (a "
                             "development set for choosing settings, disjoint from every held-out clip)")
    parser.add_argument("--corpus-cache", type=Path, default=Path(".build/corpus.json"),
                        help="reuse the corpus split computed by prepare_data.py (built if missing)")
    args = parser.parse_args()

    train_docs, heldout_docs = corpus_cached(args.corpus_cache)
    heldout = args.split == "heldout"
    jobs = plan_jobs(heldout_docs if heldout else train_docs, args.num * 2, heldout=heldout, seed=args.seed,
                     buckets=((1.0, args.min_seconds, args.max_seconds),))
    clips_dir = args.out / "clips"
    clips_dir.mkdir(parents=True, exist_ok=True)
    lines, i = [], 0
    for job in jobs:
        if len(lines) >= args.num:
            break
        voice = VoiceSetting(**job["voice"])
        assert is_heldout_voice(voice) == heldout
        text, audio = speak_within_limit(job["text"], voice, limit=args.max_seconds)
        seconds = len(audio) / SAMPLE_RATE
        if not args.min_seconds <= seconds <= args.max_seconds:
            continue  # the length estimate missed; keep the set within its advertised range
        rel = f"clips/{i:04d}.wav"
        tmp = args.out / f"{rel}.tmp.wav"
        sf.write(tmp, audio, SAMPLE_RATE, subtype="PCM_16")
        os.replace(tmp, args.out / rel)
        lines.append(json.dumps({"audio": rel, "text": text, "lang": "en"}) + "\n")
        i += 1
    manifest = args.out / "manifest.jsonl"
    tmp = args.out / ".manifest.jsonl.tmp"
    tmp.write_text("".join(lines))
    os.replace(tmp, manifest)
    print(f"wrote {len(lines)} clips to {manifest}")


if __name__ == "__main__":
    main()
