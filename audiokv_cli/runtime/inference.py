"""One clip in, one transcript or answer out, with the cache policy applied and the costs measured."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from audiokv_cli.compression.methods import build_policy
from audiokv_cli.compression.policy import CompressionPolicy, CompressionSession
from audiokv_cli import runtime

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class ClipResult:
    clip: str
    text: str
    model: str
    method: str
    retention: float
    scope: str
    audio_seconds: float
    prompt_tokens: int
    audio_tokens: int
    generated_tokens: int
    kv_bytes_full: int
    kv_bytes_kept: int
    #: the compressed entries (prompt, or Whisper's encoder frames) at 16 bits: what --kv-budget is a fraction of
    kv_bytes_full_16bit: int
    #: bits per stored element of the kept entries (the model dtype's when not quantized)
    kv_bits: int
    #: the byte budget the run was given (None: retention and bits were given directly)
    kv_budget: float | None
    #: what happened to evicted entries: none (dropped), mean or values (merged into kept neighbours)
    merge: str
    seconds_prefill: float
    seconds_decode: float
    hit_token_limit: bool
    token_ids: list[int] = field(default_factory=list)
    #: entries per head of the compressed cache before eviction: the prompt, or (Whisper) the encoder frames
    cache_entries: int = 0
    kept_per_head: dict = field(default_factory=dict)
    #: an encoder-decoder's cross-attention cache: per layer and head ("kv") or the encoder output once ("latent")
    cross_store: str | None = None

    @classmethod
    def of(cls, adapter, policy, prepared, tokens: list[int], *, clip: str, kv_bytes_full: int, kv_bytes_kept: int,
           seconds_prefill: float, seconds_decode: float, hit_token_limit: bool, kept_per_head: dict | None = None):
        """The result of decoding ``prepared`` under ``policy`` (as the session resolved it: a byte budget's
        retention and bits): what the clip, model and policy say, plus the run's own figures."""
        return cls(
            clip=clip,
            text=adapter.decode(tokens),
            model=adapter.name,
            method=policy.name,
            retention=policy.retention,
            scope=policy.scope,
            audio_seconds=round(prepared.audio_seconds, 3),
            prompt_tokens=prepared.prompt_tokens,
            cache_entries=prepared.compressed_length,
            audio_tokens=prepared.audio_tokens,
            generated_tokens=len(tokens),
            kv_bytes_full=kv_bytes_full,
            kv_bytes_kept=kv_bytes_kept,
            kv_bytes_full_16bit=full_bytes_16bit(adapter, prepared),
            kv_bits=policy.stored_bits(adapter.dtype),
            kv_budget=policy.kv_budget,
            merge=policy.merge_mode,
            seconds_prefill=round(seconds_prefill, 4),
            seconds_decode=round(seconds_decode, 4),
            hit_token_limit=hit_token_limit,
            token_ids=tokens,
            kept_per_head=kept_per_head or {},
            cross_store=policy.cross_store if adapter.compressed_attention == "cross" else None,
        )

    @property
    def kept_ratio(self) -> float:
        return self.kv_bytes_kept / self.kv_bytes_full if self.kv_bytes_full else 1.0

    def to_json(self, details: bool = False) -> dict:
        record = asdict(self)
        if not details:
            record.pop("token_ids")
            record.pop("kept_per_head")
        record["retention_measured"] = round(self.kept_ratio, 6)
        record["kept_ratio_16bit"] = round(self.kv_bytes_kept / self.kv_bytes_full_16bit, 6) if (
            self.kv_bytes_full_16bit
        ) else 1.0
        return record


def full_bytes_16bit(adapter, prepared) -> int:
    """`kv_bytes_full_16bit` of a prompt: its compressed entries, every cache-owning layer and KV head, K and V."""
    return prepared.compressed_length * adapter.geometry.kv_bytes_per_token(torch.float16)


def run_clip(
    adapter,
    audio: np.ndarray,
    policy: CompressionPolicy | None = None,
    prompt: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    clip: str = "",
    stop_at_eos: bool = True,
    on_token: Callable[[list[int]], None] | None = None,
    prefill_chunk: int | None = None,
) -> ClipResult:
    """Prefill with full attention, compress the cache as ``policy`` says, then decode greedily.

    ``on_token`` sees the generated ids so far after each step (for streaming output). ``prefill_chunk`` prefills
    in chunks of that many tokens, compressing after each (`compression.chunked`).
    """
    policy = policy or build_policy("full")
    prepared = adapter.prepare(audio, prompt)
    if prefill_chunk:
        from audiokv_cli.compression.chunked import ChunkedSession

        session = ChunkedSession(policy, adapter, prepared, prefill_chunk)
    else:
        session = CompressionSession(policy, adapter, prepared)
    output = runtime.run(
        adapter, session, prepared.inputs, max_new_tokens, stop_at_eos=stop_at_eos,
        on_token=(lambda rows: on_token(rows[0])) if on_token is not None else None,
    )
    tokens = output.tokens[0]
    full_bytes = prepared.compressed_length * adapter.geometry.kv_bytes_per_token(adapter.dtype)
    return ClipResult.of(
        adapter, session.policy, prepared, tokens, clip=clip, kv_bytes_full=full_bytes, kv_bytes_kept=output.kept_bytes[0],
        seconds_prefill=output.seconds_prefill, seconds_decode=output.seconds_decode,
        hit_token_limit=len(tokens) >= max_new_tokens,
        kept_per_head=session.summary() if session.policy.evicts else None,
    )
