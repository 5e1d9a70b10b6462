"""Running a model under a compression policy, and the pieces every run shares.

- `runner`: the one path from prepared input to tokens (prefill one-shot, chunked or replayed from a recorded
  prefill; compression as the prefill's attention calls reach the session; greedy or sampled decoding of every
  batch row). `run`, `record_prefill` and `RunOutput` are importable from here.
- `attention`: the attention hook registered with transformers and the one rule for which call is the prefill.
- `decoding`: the prefill and token loops `runner` drives.
- `inference`: one clip in, a `ClipResult` out; `batching`: several clips as batch rows; `longform`: Whisper over
  audio of any length, window after window; `streaming`: text printed as it is decoded.

Names are imported on first use (the compression package imports `attention` from here, and `runner` imports the
compression package).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "PlainSession", "PrefillRecord", "RunOutput", "fill_from_record", "is_prefill_call", "record_prefill", "run",
    "scorer_key",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'audiokv_cli.runtime' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module("audiokv_cli.runtime.runner"), name)
    globals()[name] = value
    return value
