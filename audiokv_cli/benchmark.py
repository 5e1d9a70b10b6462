"""Memory and speed of each method on one synthetic clip, measured side by side in one run."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from audiokv_cli.audio import SAMPLE_RATE
from audiokv_cli.compression.policy import CompressionPolicy, CompressionSession
from audiokv_cli.attention import use_attention_handler
from audiokv_cli.decoding import decode_greedy, prefill


@dataclass
class BenchRow:
    method: str
    retention: float
    prompt_tokens: int
    kv_bytes_full: int
    kv_bytes_kept: int
    peak_prefill_cache_bytes: int
    seconds_prefill: float
    ms_per_token: float
    new_tokens: int
    peak_device_bytes: int | None

    @property
    def kept_ratio(self) -> float:
        return self.kv_bytes_kept / self.kv_bytes_full


def synthetic_clip(seconds: float, seed: int = 0) -> np.ndarray:
    """Speech-band noise: what the audio says does not change the cost of attending to it."""
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)


def _device_peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _device_peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def bench_policy(adapter, prepared, policy: CompressionPolicy, new_tokens: int, repeats: int = 3) -> BenchRow:
    """Best-of-``repeats`` timings of prefill and of ``new_tokens`` decode steps (EOS ignored) under ``policy``."""
    best_prefill = best_decode = float("inf")
    for _ in range(repeats):
        _device_peak_reset(adapter.device)
        session = CompressionSession(policy, adapter, prepared)
        with use_attention_handler(adapter, session):
            logits, seconds_prefill = prefill(adapter, prepared.inputs, session.cache)
            kept = session.cache.physical_bytes(include_tail=False)
            tokens, seconds_decode, _ = decode_greedy(adapter, session.cache, logits, new_tokens, stop_at_eos=False)
        best_prefill = min(best_prefill, seconds_prefill)
        best_decode = min(best_decode, seconds_decode / max(1, len(tokens) - 1))
    full = prepared.prompt_tokens * adapter.geometry.kv_bytes_per_token(adapter.dtype)
    return BenchRow(
        method=policy.name,
        retention=policy.retention,
        prompt_tokens=prepared.prompt_tokens,
        kv_bytes_full=full,
        kv_bytes_kept=kept,
        peak_prefill_cache_bytes=session.peak_prefill_bytes if policy.evicts else kept,
        seconds_prefill=best_prefill,
        ms_per_token=1000 * best_decode,
        new_tokens=len(tokens),
        peak_device_bytes=_device_peak(adapter.device),
    )
