"""Long-form WER against the same speech cut into sub-30 s clips (docs/results.md, "Long-form Whisper").

    python scripts/longform/measure_wer.py --data .build/longform --model whisper-base \
        --runs clips:full,long:full,long:audiokv:0.5 --out .build/longform/wer.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from audiokv_cli.io.audio import load_audio
from audiokv_cli.commands.infer import resolve_head_scores
from audiokv_cli.compression.methods import MethodOptions, resolve_method
from audiokv_cli.evaluation.metrics import clip_wer
from audiokv_cli.runtime.inference import run_clip
from audiokv_cli.runtime.longform import transcribe_files
from audiokv_cli.models.registry import load_adapter


def policy_for(adapter, method: str, retention: float):
    spec = resolve_method(method)
    options = MethodOptions()
    if spec.uses_profile:
        options.head_scores = resolve_head_scores(adapter, None)
    return spec.policy(retention, options)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", default="whisper-base")
    parser.add_argument("--runs", default="clips:full,long:full,long:audiokv:0.5")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    adapter = load_adapter(args.model, device="cpu", dtype="float32")
    rows = [json.loads(line) for line in (args.data / "clips.jsonl").read_text().splitlines()]
    reference = " ".join(row["text"] for row in rows)
    audio_seconds = load_audio(args.data / "long.wav").shape[0] / 16000
    results = []
    for run in args.runs.split(","):
        kind, method, *rest = run.split(":")
        retention = float(rest[0]) if rest else 1.0
        policy = policy_for(adapter, method, retention)
        start = time.perf_counter()
        if kind == "clips":
            hypothesis = " ".join(run_clip(adapter, load_audio(row["audio"]), policy).text for row in rows)
            extra = {}
        else:
            transcript = next(iter(transcribe_files(adapter, [str(args.data / "long.wav")], policy)))
            hypothesis = transcript.text
            extra = {"windows": transcript.windows, "fallbacks": transcript.fallbacks,
                     "kv_bytes_full": transcript.kv_bytes_full, "kv_bytes_kept_max": transcript.kv_bytes_kept_max}
        seconds = time.perf_counter() - start
        record = {"run": run, "model": args.model, "wer": round(100 * clip_wer(reference, hypothesis), 2),
                  "seconds": round(seconds, 1), "real_time_factor": round(seconds / audio_seconds, 3), **extra}
        print(json.dumps(record), flush=True)
        results.append({**record, "hypothesis": hypothesis})
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
