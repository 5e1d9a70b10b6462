#!/usr/bin/env python3
"""WER of `audiokv infer` on a long-form manifest (dev-long/manifest.jsonl): one long-form transcript per recording.

    python scripts/devset/longform_wer.py .build/dev-long/manifest.jsonl --model whisper-base [--only long_5min]
        [extra infer options, e.g. --method audiokv --kv-budget 0.125]

Compare with `audiokv eval --data .build/dev-long/pieces-5min.jsonl ...` (the same speech as sub-30 s pieces).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from audiokv_cli.evaluation.metrics import corpus_wer, normalize


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--model", default="whisper-base")
    parser.add_argument("--only", help="comma-separated ids")
    parser.add_argument("--out", type=Path, help="write the transcripts and WER here (JSON)")
    args, extra = parser.parse_known_args()  # anything else goes to `audiokv infer`
    extra = [a for a in extra if a != "--"]
    rows = [json.loads(line) for line in args.manifest.read_text().splitlines() if line.strip()]
    if args.only:
        wanted = set(args.only.split(","))
        rows = [r for r in rows if r["id"] in wanted]
    results = []
    for entry in rows:
        audio = args.manifest.parent / entry["audio"]
        started = time.time()
        command = ["audiokv", "infer", str(audio), "--model", args.model, "--json", *extra]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{entry['id']}: infer failed: {done.stderr.strip()[-800:]}", file=sys.stderr)
            continue
        try:
            objects = [json.loads(done.stdout)]
        except json.JSONDecodeError:
            objects = [json.loads(line) for line in done.stdout.splitlines() if line.strip().startswith("{")]
        hypothesis = " ".join(o.get("text", "") for o in objects)
        wer = corpus_wer([entry["text"]], [hypothesis])
        result = {"id": entry["id"], "duration": entry["duration"], "wer": wer,
                  "ref_words": len(normalize(entry["text"]).split()), "hyp_words": len(normalize(hypothesis).split()),
                  "seconds": round(time.time() - started, 1), "hyp": hypothesis}
        results.append(result)
        print(f"{entry['id']}: {entry['duration']:.0f} s, WER {100 * wer:.2f}% (ref {result['ref_words']} words, hyp "
              f"{result['hyp_words']}), {result['seconds']} s", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
