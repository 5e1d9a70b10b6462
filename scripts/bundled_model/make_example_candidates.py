"""Synthesize short candidate clips for ``examples/`` (pick the ones the shipped model gets right with
pick_examples.py after running evaluate.py on them).

Two manifests: ``heldout`` (short sentences of held-out documents, held-out voices: nothing seen in training) and
``seen-text`` (short sentences of training documents spoken by clean, default training voices).

Usage: python scripts/bundled_model/make_example_candidates.py --out .build/example-candidates --num 40 --num-seen 120
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import soundfile as sf

sys.path.insert(0, str(Path(__file__).parent))
from prepare_data import corpus_cached  # noqa: E402
from speech import SAMPLE_RATE, VoiceSetting, sample_voice, synthesize  # noqa: E402

CLEAN_TRAIN_VOICES = (
    VoiceSetting("espeak", "en-us", 160.0, 50),
    VoiceSetting("espeak", "en-gb", 165.0, 45),
    VoiceSetting("flite", "slt", 1.0, 0),
    VoiceSetting("flite", "awb", 1.05, 0),
)


def short_sentences(docs, rng: random.Random, n: int, min_words: int = 4, max_words: int = 10) -> list[str]:
    pool = [s for d in docs for s in d.sentences if min_words <= len(s.split()) <= max_words]
    rng.shuffle(pool)
    return pool[:n]


def write_set(out: Path, name: str, items: list[tuple[str, VoiceSetting]]) -> None:
    folder = out / name
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (text, voice) in enumerate(items):
        audio = synthesize(text, voice)
        rel = f"clips/{i:04d}.wav"
        sf.write(folder / rel, audio, SAMPLE_RATE, subtype="PCM_16")
        lines.append(json.dumps({"audio": rel, "text": text, "lang": "en"}) + "\n")
    tmp = folder / ".manifest.tmp"
    tmp.write_text("".join(lines))
    os.replace(tmp, folder / "manifest.jsonl")
    print(f"{name}: {len(lines)} clips")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".build/example-candidates"))
    parser.add_argument("--num", type=int, default=40)
    parser.add_argument("--num-seen", type=int, default=120)
    parser.add_argument("--min-words", type=int, default=3)
    parser.add_argument("--max-words", type=int, default=7)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--corpus-cache", type=Path, default=Path(".build/corpus.json"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    train_docs, heldout_docs = corpus_cached(args.corpus_cache)
    heldout = [(t, sample_voice(rng, heldout=True))
               for t in short_sentences(heldout_docs, rng, args.num, args.min_words, args.max_words)]
    seen = [(t, CLEAN_TRAIN_VOICES[i % len(CLEAN_TRAIN_VOICES)])
            for i, t in enumerate(short_sentences(train_docs, rng, args.num_seen, args.min_words, args.max_words))]
    write_set(args.out, "heldout", heldout)
    write_set(args.out, "seen-text", seen)


if __name__ == "__main__":
    main()
