"""Peak RSS of the long-form path over a whole file, every window through the encoder, the compressed cache and a
short decode (docs/performance.md, "Long recordings").

    python scripts/longform/longform_rss.py FILE [--model whisper-tiny.en] [--max-new-tokens 8]

`--max-new-tokens` caps each window's decode so that a 60-minute file fits a short run: the window's audio, features,
encoder output and cross-attention cache are those of a full run; fewer tokens are generated, and a window whose
last segment is cut by the cap moves on by its last complete segment, or by the whole window when none is complete
(so a capped run visits about as many windows as the audio has 30 s windows). One temperature: no fallbacks.
"""

import argparse
import resource
import time

from audiokv_cli.runtime.longform import LongformOptions, transcribe_files
from audiokv_cli.models.registry import load_adapter

parser = argparse.ArgumentParser()
parser.add_argument("file")
parser.add_argument("--model", default="whisper-tiny.en")
parser.add_argument("--max-new-tokens", type=int, default=8)
args = parser.parse_args()
adapter = load_adapter(args.model, device="cpu", dtype="float32")
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
options = LongformOptions(temperatures=(0.0,), max_new_tokens=args.max_new_tokens)
started = time.perf_counter()
transcript = next(iter(transcribe_files(adapter, [args.file], None, options)))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{args.file}: {transcript.audio_seconds / 60:.1f} min, {transcript.windows} windows, "
      f"{transcript.generated_tokens} tokens, {time.perf_counter() - started:.0f} s; peak RSS {peak / 1024:.1f} MiB "
      f"(after loading the model {loaded / 1024:.1f} MiB)", flush=True)
