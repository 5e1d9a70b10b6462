"""Token-importance scorers: how much each prompt position matters to each KV head.

A scorer turns the post-rotary queries and keys the model actually used in prefill into one float32 score per
(batch, KV head, prompt position). Higher means "keep". Attention-based scorers never build an L x L matrix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from audiokv_cli.errors import AudiokvError


@runtime_checkable
class Scorer(Protocol):
    name: str

    def score(self, queries: Tensor, keys: Tensor, scaling: float) -> Tensor:
        """queries [B, Hq, Lq, D], keys [B, Hkv, L, D] -> float32 scores [B, Hkv, L].

        Self-attention prefill has Lq = L (causal). Cross-attention (an encoder-decoder's audio cache) has the
        decoder's prompt as queries, Lq != L, and no causal mask: every query sees every key.
        """
        ...


def _is_cross(queries: Tensor, keys: Tensor) -> bool:
    return queries.shape[2] != keys.shape[2]


def _check_shapes(queries: Tensor, keys: Tensor) -> tuple[int, int, int, int]:
    """(batch, query heads, KV heads, key length) after checking the shapes fit together."""
    if queries.dim() != 4 or keys.dim() != 4:
        raise AudiokvError("scorer expects queries [B, Hq, Lq, D] and keys [B, Hkv, L, D]")
    batch, num_query_heads, _, head_dim = queries.shape
    num_kv_heads, length = keys.shape[1], keys.shape[2]
    if keys.shape[0] != batch or keys.shape[3] != head_dim:
        raise AudiokvError(f"query shape {tuple(queries.shape)} does not match key shape {tuple(keys.shape)}")
    if num_kv_heads == 0 or num_query_heads % num_kv_heads:
        raise AudiokvError(f"{num_query_heads} query heads cannot be grouped over {num_kv_heads} KV heads")
    return batch, num_query_heads, num_kv_heads, length


def _grouped_attention_probs(
    queries: Tensor, keys: Tensor, scaling: float, query_positions: Tensor | None, key_end: int
) -> Tensor:
    """Causal softmax attention of some queries over keys[:key_end], kept grouped per KV head.

    queries [B, Hq, q, D] sit at absolute positions `query_positions` [q] (None: cross-attention, no causal mask).
    Returns float32 [B, Hkv, G, q, key_end].
    Query head h belongs to KV head h // G (contiguous groups, the layout transformers' repeat_kv assumes), so a
    plain view groups them; no repeated copy of the keys is made.
    """
    batch, num_query_heads, q_len, head_dim = queries.shape
    num_kv_heads = keys.shape[1]
    group = num_query_heads // num_kv_heads
    grouped = queries.float().reshape(batch, num_kv_heads, group * q_len, head_dim)
    logits = torch.matmul(grouped, keys[:, :, :key_end].float().transpose(-1, -2)) * scaling
    logits = logits.view(batch, num_kv_heads, group, q_len, key_end)
    if query_positions is not None:
        key_positions = torch.arange(key_end, device=queries.device)
        future = key_positions[None, :] > query_positions[:, None]  # [q, key_end]
        logits = logits.masked_fill(future, float("-inf"))
    return torch.softmax(logits, dim=-1)


@dataclass
class WindowAttentionScorer:
    """SnapKV observation window: attention of the last `window` prompt positions over all keys.

    Averaged over the window queries, then over the query heads of each GQA group. Memory: [B, Hq, w, L].
    """

    window: int = 32
    name: str = dataclasses.field(default="window", init=False)

    def __post_init__(self) -> None:
        if self.window < 1:
            raise AudiokvError(f"window must be >= 1, got {self.window}")

    def score(self, queries: Tensor, keys: Tensor, scaling: float) -> Tensor:
        _, _, _, length = _check_shapes(queries, keys)
        if _is_cross(queries, keys):
            # Cross-attention: the decoder's last `window` prompt queries over every encoder frame.
            window = queries[:, :, -self.window :]
            return _grouped_attention_probs(window, keys, scaling, None, length).mean(dim=(2, 3))
        w = min(self.window, length)
        positions = torch.arange(length - w, length, device=queries.device)
        probs = _grouped_attention_probs(queries[:, :, length - w :], keys, scaling, positions, length)
        return probs.mean(dim=(2, 3))


@dataclass
class AccumulatedAttentionScorer:
    """H2O heavy hitters: the causal attention each key receives, summed over every prompt query.

    Computed over query chunks, so memory is [B, Hq, chunk, L] at most. GQA groups are averaged.
    `normalize=False` (default) keeps H2O's plain accumulated sum, the published baseline; it favours early keys
    because more queries can see them. `normalize=True` divides key j's sum by the L - j queries that can see it
    (mean received attention), which removes that positional bias.
    """

    chunk: int = 256
    normalize: bool = False
    name: str = dataclasses.field(default="h2o", init=False)

    def __post_init__(self) -> None:
        if self.chunk < 1:
            raise AudiokvError(f"chunk must be >= 1, got {self.chunk}")

    def score(self, queries: Tensor, keys: Tensor, scaling: float) -> Tensor:
        batch, _, num_kv_heads, length = _check_shapes(queries, keys)
        if _is_cross(queries, keys):
            # Every decoder prompt query sees every frame, so there is no positional bias to normalize.
            return _grouped_attention_probs(queries, keys, scaling, None, length).sum(dim=3).mean(dim=2)
        total = torch.zeros(batch, num_kv_heads, length, dtype=torch.float32, device=queries.device)
        for start in range(0, length, self.chunk):
            end = min(start + self.chunk, length)
            positions = torch.arange(start, end, device=queries.device)
            # Queries in [start, end) can only see keys < end, so later keys are skipped entirely.
            probs = _grouped_attention_probs(queries[:, :, start:end], keys, scaling, positions, end)
            total[:, :, :end] += probs.sum(dim=3).mean(dim=2)
        if self.normalize:
            seen_by = torch.arange(length, 0, -1, device=queries.device, dtype=torch.float32)
            total = total / seen_by
        return total


@dataclass
class RandomScorer:
    """Uniform random scores from a generator seeded on every call: same shapes give the same scores,
    whatever the global RNG state (so every layer of one prompt draws the same positions)."""

    seed: int = 0
    name: str = dataclasses.field(default="random", init=False)

    def score(self, queries: Tensor, keys: Tensor, scaling: float) -> Tensor:
        batch, _, num_kv_heads, length = _check_shapes(queries, keys)
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        scores = torch.rand(batch, num_kv_heads, length, generator=generator, dtype=torch.float32)
        return scores.to(queries.device)


def bit_reversal_rank(length: int) -> Tensor:
    """Rank [L] of each position in a low-discrepancy (van der Corput) order: any prefix of the order is spread
    evenly over [0, L). The k-th point of the base-2 van der Corput sequence is reverse_bits(k) / 2^m; it lands on
    position floor(reverse_bits(k) * L / 2^m) and positions are ranked by their first hit (2^m >= L hits all)."""
    if length <= 0:
        return torch.zeros(0, dtype=torch.long)
    bits = max(1, math.ceil(math.log2(length)))
    count = 1 << bits
    k = torch.arange(count, dtype=torch.long)
    reversed_k = torch.zeros_like(k)
    for bit in range(bits):
        reversed_k |= ((k >> bit) & 1) << (bits - 1 - bit)
    hit_positions = (reversed_k * length) >> bits
    first_hit = torch.full((length,), count, dtype=torch.long)
    first_hit = first_hit.scatter_reduce(0, hit_positions, k, reduce="amin")
    return torch.argsort(torch.argsort(first_hit))


@dataclass
class StrideScorer:
    """Position-only baseline: the top-b positions are evenly spaced over the prompt for every b."""

    name: str = dataclasses.field(default="stride", init=False)

    def score(self, queries: Tensor, keys: Tensor, scaling: float) -> Tensor:
        batch, _, num_kv_heads, length = _check_shapes(queries, keys)
        rank = bit_reversal_rank(length).to(torch.float32)
        scores = 1.0 - rank / max(length, 1)
        return scores.to(queries.device).expand(batch, num_kv_heads, length).contiguous()


@dataclass
class StreamingScorer:
    """StreamingLLM: the first `sinks` positions (attention sinks) rank highest, then the most recent ones."""

    sinks: int = 4
    #: where "recent" ends: positions from here on rank below every earlier one. A cross-attention cache sets it to
    #: the end of the clip's frames, so its most recent entries are the end of the speech, not the padding after it.
    recent_end: int | None = None
    name: str = dataclasses.field(default="streaming", init=False)

    def __post_init__(self) -> None:
        if self.sinks < 0:
            raise AudiokvError(f"sinks must be >= 0, got {self.sinks}")

    def score(self, queries: Tensor, keys: Tensor, scaling: float) -> Tensor:
        batch, _, num_kv_heads, length = _check_shapes(queries, keys)
        positions = torch.arange(length, dtype=torch.float32)
        # Recent positions score in [0, 1); sinks score above 1, earlier sinks higher.
        scores = positions / max(length, 1)
        if self.recent_end is not None and self.recent_end < length:
            # After the anchor: below every anchored position, later ones lower still.
            scores[self.recent_end :] = -positions[self.recent_end :] / max(length, 1)
        sinks = min(self.sinks, length)
        scores[:sinks] = 2.0 - positions[:sinks] / max(length, 1)
        return scores.to(queries.device).expand(batch, num_kv_heads, length).contiguous()


_SCORERS = {
    "window": WindowAttentionScorer,
    "h2o": AccumulatedAttentionScorer,
    "random": RandomScorer,
    "stride": StrideScorer,
    "streaming": StreamingScorer,
}

SCORER_NAMES = tuple(_SCORERS)


def make_scorer(name: str, **params) -> Scorer:
    """Build a scorer by short name (window, h2o, random, stride, streaming) with its parameters."""
    return _build(_SCORERS, "scorer", name, params)


def _build(registry: dict, kind: str, name: str, params: dict):
    if name not in registry:
        raise AudiokvError(f"unknown {kind} {name!r}; choose one of: {', '.join(registry)}")
    cls = registry[name]
    allowed = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - allowed)
    if unknown:
        accepted = ", ".join(sorted(allowed)) or "none"
        raise AudiokvError(f"{kind} {name!r} does not take {', '.join(unknown)} (accepted: {accepted})")
    return cls(**params)
