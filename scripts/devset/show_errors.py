#!/usr/bin/env python3
"""Per-clip WER and the word differences of an `audiokv eval --out DIR` run (to re-check references).

    python scripts/devset/show_errors.py .build/devset-eval/dev-tts-whisper-base [--group engine --data .build/dev-tts]
"""

from __future__ import annotations

import argparse
import difflib
import json
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", type=Path, help="eval --out directory (reads results.json)")
    parser.add_argument("--data", type=Path, help="the manifest or set directory, for --group")
    parser.add_argument("--group", help="manifest field to total WER by (engine, speaker, kind...)")
    args = parser.parse_args()
    clips = json.loads((args.results / "results.json").read_text())["clips"]
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    fields = {}
    if args.data:
        manifest = args.data / "manifest.jsonl" if args.data.is_dir() else args.data
        fields = {r["id"]: r for r in map(json.loads, manifest.read_text().splitlines()) if r}
    total_err = total_words = 0
    for clip in clips:
        ref, hyp = clip["ref_normalized"].split(), clip["hyp_normalized"].split()
        errors = round(clip["wer"] * len(ref))
        total_err += errors
        total_words += len(ref)
        if args.group:
            key = str(fields.get(clip["clip"], {}).get(args.group))
            groups[key][0] += errors
            groups[key][1] += len(ref)
        diffs = []
        for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=ref, b=hyp, autojunk=False).get_opcodes():
            if op != "equal":
                diffs.append(f"[{' '.join(ref[i1:i2])} -> {' '.join(hyp[j1:j2])}]")
        flags = " DEGENERATE" if clip.get("degenerate") else ""
        flags += " TOKEN-LIMIT" if clip.get("hit_token_limit") else ""
        print(f"{clip['clip']:<34} wer {100 * clip['wer']:5.1f}% ({errors}/{len(ref)}){flags} {' '.join(diffs)}")
    print(f"corpus WER {100 * total_err / max(1, total_words):.2f}% ({total_err}/{total_words})")
    for key, (errors, words) in sorted(groups.items()):
        print(f"  {args.group}={key}: {100 * errors / max(1, words):.2f}% ({errors}/{words})")


if __name__ == "__main__":
    main()
