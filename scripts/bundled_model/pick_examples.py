"""Copy a few held-out clips the shipped model transcribes exactly into ``examples/`` (clipN.wav + clipN.txt).

Candidates are the per-clip results written by evaluate.py (held-out texts and voices, never trained on); a clip
qualifies when the normalized hypothesis equals the normalized reference. The shortest qualifying clip becomes
clip1 (the one the tests transcribe).

Usage: python scripts/bundled_model/pick_examples.py --results .build/eval-results-short.jsonl \\
           --results .build/eval-results-long.jsonl --eval-dir .build/eval-short --eval-dir .build/eval-long
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

import soundfile as sf


def main() -> None:
    from whisper_normalizer.english import EnglishTextNormalizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, action="append", required=True)
    parser.add_argument("--eval-dir", type=Path, action="append", required=True)
    parser.add_argument("--out", type=Path, default=Path("examples"))
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--min-seconds", type=float, default=2.5)
    parser.add_argument("--min-words", type=int, default=4)
    args = parser.parse_args()

    norm = EnglishTextNormalizer()
    picked: list[tuple[float, Path, str]] = []
    # Earlier --results files are preferred (list held-out candidates first); within a file, longer clips first.
    for results, eval_dir in zip(args.results, args.eval_dir):
        correct = []
        for line in results.read_text().splitlines():
            row = json.loads(line)
            # plain sentences only (letters, spaces, apostrophes, a final full stop): an example should read
            # naturally, and its .txt is compared with the output as it is
            plain = re.fullmatch(r"[A-Za-z' ]+\.?", row["ref"].strip()) is not None
            long_enough = len(row["ref"].split()) >= args.min_words
            if plain and long_enough and norm(row["ref"]).split() == norm(row["hyp"]).split():
                path = eval_dir / row["audio"]
                seconds = sf.info(str(path)).duration
                if seconds >= args.min_seconds:
                    correct.append((seconds, path, row["ref"]))
        picked += sorted(correct, reverse=True)[: args.count - len(picked)]
    if len(picked) < 3:
        raise SystemExit(f"only {len(picked)} clips are transcribed exactly; need at least 3")
    ordered = sorted(picked)  # clip1 = the shortest (the one the tests transcribe)
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("clip*.*"):
        old.unlink()
    for n, (seconds, path, text) in enumerate(ordered, start=1):
        tmp = args.out / f".clip{n}.wav.tmp"
        shutil.copyfile(path, tmp)
        os.replace(tmp, args.out / f"clip{n}.wav")
        (args.out / f"clip{n}.txt").write_text(text + "\n")
        print(f"clip{n}: {seconds:.1f} s  {text}")


if __name__ == "__main__":
    main()
