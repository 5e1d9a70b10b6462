"""Memory and speed of each method on one synthetic prompt, measured side by side in one run.

Repeats are interleaved (every method once, then every method again, best of each), so a machine whose load
changes during the run slows all methods alike and the ratios against the full cache hold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from audiokv_cli.io.audio import SAMPLE_RATE
from audiokv_cli.compression.policy import CompressionPolicy, CompressionSession
from audiokv_cli import runtime
from audiokv_cli.compression.chunked import ChunkedSession
from audiokv_cli.runtime.decoding import synchronize
from audiokv_cli.errors import AudiokvError
from audiokv_cli.runtime.inference import full_bytes_16bit
from audiokv_cli.bench.memory import PeakTensorBytes

# Filler for prompts longer than the model's audio limit: ordinary text, so tokenizers split it as they would a
# spoken-word transcript.
FILLER_TEXT = (
    "The committee met on a grey morning to go over the figures again, and every member had a different story about "
    "where the missing hours had gone, who had signed the forms, and why the report was late. "
)


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
    # Scoring, smoothing, selection and the gather into the ragged cache, summed over layers (inside prefill).
    seconds_compress: float = 0.0
    # CUDA: max allocated during prefill and decode. CPU: most bytes of tensors created by the run alive at once
    # (cache, activations, attention buffers; weights excluded), from a separate untimed run.
    peak_memory_bytes: int | None = None
    # Decode tokens per second at each batch size (rows are copies of the prompt).
    tokens_per_second: dict[int, float] = field(default_factory=dict)
    # The compressed entries at 16 bits (what --kv-budget is a fraction of), the stored bits and the byte budget.
    kv_bytes_full_16bit: int = 0
    kv_bits: int | None = None
    kv_budget: float | None = None

    @property
    def kept_ratio(self) -> float:
        return self.kv_bytes_kept / self.kv_bytes_full


def synthetic_clip(seconds: float, seed: int = 0) -> np.ndarray:
    """Speech-band noise: what the audio says does not change the cost of attending to it."""
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)


def _filler_ids(adapter, count: int) -> torch.Tensor:
    tokenizer = getattr(adapter.processor, "tokenizer", adapter.processor)
    ids = tokenizer(FILLER_TEXT, add_special_tokens=False)["input_ids"]
    return torch.tensor((ids * (count // len(ids) + 1))[:count], dtype=torch.long)


def pad_with_text(adapter, prepared, count: int):
    """``prepared`` with ``count`` filler text tokens before the conversation (audio spans shifted)."""
    if count <= 0:
        return prepared
    filler = _filler_ids(adapter, count).to(prepared.input_ids.device)[None]
    inputs = dict(prepared.inputs)
    inputs["input_ids"] = torch.cat([filler, prepared.input_ids], dim=-1)
    if "attention_mask" in inputs:
        inputs["attention_mask"] = torch.cat([torch.ones_like(filler), inputs["attention_mask"]], dim=-1)
    spans = [(start + count, end + count) for start, end in prepared.audio_spans]
    return replace(prepared, inputs=inputs, input_ids=inputs["input_ids"], audio_spans=spans)


def prompt_of(adapter, tokens: int, max_seconds: float | None = None):
    """A prompt of exactly ``tokens`` tokens: as much synthetic audio as fits (the model's limit, ``max_seconds``)
    and filler text for the rest."""
    if adapter.compressed_attention == "cross":
        # The cached encoder frames are set by the audio alone (Whisper: always one 30 s window); filler text
        # would only lengthen the decoder's prompt, which is not the cache being compressed.
        raise AudiokvError(
            f"--prompt-tokens is for decoder-only models; {adapter.name} compresses a cross-attention cache of "
            "encoder frames, set by the audio alone: vary it with --seconds instead"
        )
    limit = min(adapter.max_audio_seconds, max_seconds or float("inf"))
    probe = adapter.prepare(synthetic_clip(min(10.0, limit)))
    text_tokens = probe.prompt_tokens - probe.audio_tokens
    if tokens < text_tokens + 1:
        raise AudiokvError(
            f"--prompt-tokens {tokens} is shorter than this model's prompt around its audio ({text_tokens + 1})"
        )
    per_second = probe.audio_tokens / probe.audio_seconds
    seconds = min(limit, (tokens - text_tokens) / per_second)
    prepared = adapter.prepare(synthetic_clip(seconds))
    # Segment boundaries and frame rounding add a few tokens: shorten the audio until the prompt fits.
    while prepared.prompt_tokens > tokens:
        seconds *= max(0.5, 1 - (prepared.prompt_tokens - tokens + 1) / max(prepared.audio_tokens, 1))
        prepared = adapter.prepare(synthetic_clip(seconds))
    return pad_with_text(adapter, prepared, tokens - prepared.prompt_tokens)


def batched(prepared, batch: int):
    """``batch`` copies of one prompt as one batch (no padding: every row has the same tokens and audio)."""
    if batch == 1:
        return prepared
    inputs = {key: value.repeat(batch, *([1] * (value.dim() - 1))) for key, value in prepared.inputs.items()}
    return replace(prepared, inputs=inputs, input_ids=inputs["input_ids"])


def _device_peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _device_peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _time_compression(session) -> None:
    """Add up, on ``session.seconds_compress``, the seconds its layers spend choosing and gathering what they keep."""
    name = "compress_chunk" if isinstance(session, ChunkedSession) else "compress_layer"
    original = getattr(session, name)
    device = session.adapter.device

    def timed(*args, **kwargs):
        synchronize(device)
        start = time.perf_counter()
        original(*args, **kwargs)
        synchronize(device)
        session.seconds_compress += time.perf_counter() - start

    session.seconds_compress = 0.0
    setattr(session, name, timed)


def _run(adapter, prepared, policy: CompressionPolicy, new_tokens: int, prefill_chunk: int | None = None):
    if prefill_chunk:
        session = ChunkedSession(policy, adapter, prepared, prefill_chunk)
    else:
        session = CompressionSession(policy, adapter, prepared)
    _time_compression(session)
    output = runtime.run(adapter, session, prepared.inputs, new_tokens, stop_at_eos=False)
    return session, output.kept_bytes[0], output.seconds_prefill, output.tokens[0], output.seconds_decode


def bench_policy(adapter, prepared, policy: CompressionPolicy, new_tokens: int, repeats: int = 3) -> BenchRow:
    """Best-of-``repeats`` timings of prefill and of ``new_tokens`` decode steps (EOS ignored) under ``policy``."""
    return bench_policies(adapter, prepared, [policy], new_tokens, repeats)[0]


def bench_policies(
    adapter,
    prepared,
    policies: list[CompressionPolicy],
    new_tokens: int,
    repeats: int = 3,
    batch_sizes: tuple[int, ...] = (),
    measure_memory: bool = False,
    prefill_chunk: int | None = None,
) -> list[BenchRow]:
    """One row per policy: best-of-``repeats`` prefill and decode timings, interleaved across policies."""
    best = [dict(prefill=float("inf"), decode=float("inf"), compress=float("inf")) for _ in policies]
    outcome: list[tuple] = [()] * len(policies)
    for _ in range(repeats):
        for index, policy in enumerate(policies):
            _device_peak_reset(adapter.device)
            session, kept, seconds_prefill, tokens, seconds_decode = _run(
                adapter, prepared, policy, new_tokens, prefill_chunk
            )
            record = best[index]
            record["prefill"] = min(record["prefill"], seconds_prefill)
            record["decode"] = min(record["decode"], seconds_decode / max(1, len(tokens) - 1))
            record["compress"] = min(record["compress"], session.seconds_compress)
            outcome[index] = (session, kept, tokens, _device_peak(adapter.device))
    rows = []
    full = prepared.compressed_length * adapter.geometry.kv_bytes_per_token(adapter.dtype)
    for policy, record, (session, kept, tokens, device_peak) in zip(policies, best, outcome):
        peak_memory = device_peak
        if measure_memory and adapter.device.type != "cuda":
            with PeakTensorBytes() as meter:
                _run(adapter, prepared, policy, new_tokens, prefill_chunk)
            peak_memory = meter.peak
        run = session.policy  # a byte budget's retention and bits filled in
        rows.append(
            BenchRow(
                method=policy.name,
                retention=run.retention,
                kv_bytes_full_16bit=full_bytes_16bit(adapter, prepared),
                kv_bits=run.stored_bits(adapter.dtype),
                kv_budget=run.kv_budget,
                prompt_tokens=prepared.prompt_tokens,
                kv_bytes_full=full,
                kv_bytes_kept=kept,
                peak_prefill_cache_bytes=session.peak_prefill_bytes if policy.compresses or prefill_chunk else kept,
                seconds_prefill=record["prefill"],
                ms_per_token=1000 * record["decode"],
                new_tokens=len(tokens),
                peak_device_bytes=device_peak,
                seconds_compress=record["compress"] if policy.evicts else 0.0,
                peak_memory_bytes=peak_memory,
            )
        )
    for batch in batch_sizes:
        rows_prepared = batched(prepared, batch)
        for row, policy in zip(rows, policies):
            best_seconds = float("inf")
            for _ in range(max(1, repeats - 1)):
                _, _, _, tokens, seconds_decode = _run(adapter, rows_prepared, policy, new_tokens, prefill_chunk)
                best_seconds = min(best_seconds, seconds_decode / max(1, len(tokens) - 1))
            row.tokens_per_second[batch] = batch / best_seconds
    return rows


def streams_in_budget(row: BenchRow, budget_bytes: float, kv_bytes_per_token: int) -> int:
    """How many streams of this prompt (kept prompt entries plus the generated tokens) fit in ``budget_bytes``."""
    per_stream = row.kv_bytes_kept + row.new_tokens * kv_bytes_per_token
    return int(budget_bytes // per_stream)
