"""The cells of one clip decoded at once: one batch row per policy, all rows the same prompt.

For an encoder-decoder (Whisper) the audio cache is the cross-attention over the encoder frames. The encoder runs
once; each batch row then compresses its own copy of the cross-attention cache with its own policy (per-row
segments of the ragged cache) and all rows decode greedily in lockstep. For a decoder-only model the prompt is
prefilled once (runtime.record_prefill) and its recorded cache is replayed into every row, each row
compressed by its own policy from the recorded scores (``eval --batch-size``). A decode step reads the weights once for
the whole batch, so a sweep of N cells costs little more than one cell. Rows never see each other: every row's
attention, budgets and selection are its own, so its tokens are those of a single-row run (tested).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from audiokv_cli import runtime
from audiokv_cli.compression.policy import CompressionPolicy, CompressionSession, LayerKeepStats, stored_policy


@dataclass
class CellOutcome:
    token_ids: list[int]
    hit_token_limit: bool
    kv_bytes_kept: int
    seconds_compress: float
    seconds_decode: float
    kept_per_head: dict
    #: the policy as run (a byte budget's retention and bits filled in)
    policy: CompressionPolicy | None = None


class CellBatchSession(CompressionSession):
    """Attention handler: full attention in prefill, then each row's cache compressed by that row's policy."""

    def __init__(self, policies: Sequence[CompressionPolicy], adapter, prepared):
        super().__init__(policies[0], adapter, prepared)
        # One single-row session per policy: its budget context and keep-mask logic, never its cache.
        self.rows = [CompressionSession(policy, adapter, prepared, cache=self.cache) for policy in policies]
        self.seconds_compress = 0.0

    @property
    def evicts(self) -> bool:
        return True  # rows that keep everything are compressed to all their entries, like the others

    @property
    def compresses(self) -> bool:
        return True

    def compress_layer(self, layer_idx: int, queries, keys, scaling: float, scores=None) -> None:
        """``scores``: None (score from ``queries``) or one recorded score tensor (or None) per row."""
        start = time.perf_counter()
        if self.latent_projections is not None:
            self.compress_to_latent(layer_idx, self.rows)
            self.seconds_compress += time.perf_counter() - start
            return
        keep = torch.ones(keys.shape[:-1], dtype=torch.bool, device=keys.device)
        audio = self.audio_position_mask(keep.shape[-1], keep.device)
        for row, session in enumerate(self.rows):
            if session.policy.evicts:
                row_queries = None if queries is None else queries[row : row + 1]
                mask = session.layer_keep_mask(
                    layer_idx, row_queries, keys[row : row + 1], scaling, scores=None if scores is None else scores[row]
                )
                keep[row] = mask[0]
            session.layer_stats[layer_idx] = LayerKeepStats(
                kept=keep[row].sum(-1).tolist(),
                audio_kept=(keep[row] & audio).sum(-1).tolist(),
                text_kept=(keep[row] & ~audio).sum(-1).tolist(),
            )
        # Rows share one packed layer, so they share its storage (run_cells_batched groups rows by it).
        first = self.rows[0].policy
        self.cache.compress_layer(layer_idx, keep, self.adapter.sliding_window(layer_idx), first.quant, first.merge_mode)
        self.seconds_compress += time.perf_counter() - start

    @property
    def row_policies(self) -> list[CompressionPolicy]:
        """Each row's policy as asked for (a recorded prefill's scores are keyed by it)."""
        return [session.requested_policy for session in self.rows]

    def kept_bytes_per_row(self) -> list[int]:
        return [self.kept_bytes(row) for row in range(len(self.rows))]

    def kept_bytes(self, row: int) -> int:
        """Bytes of row `row`'s compressed prompt cache (`RaggedKVCache.kept_bytes`); a row whose policy compresses
        nothing counts what its live run keeps, the dense prompt cache (no per-head lengths)."""
        if not self.rows[row].policy.compresses:
            return self.prepared.compressed_length * self.adapter.geometry.kv_bytes_per_token(self.adapter.dtype)
        return self.cache.kept_bytes()[row]


def storage_groups(adapter, prepared, policies: Sequence[CompressionPolicy]) -> list[list[int]]:
    """Indices of ``policies`` grouped by how their kept entries are stored (per layer and head or as the encoder
    output, bits after any byte budget is spent, merging): the rows of one batch share a packed layer."""
    groups: dict[tuple, list[int]] = {}
    for index, policy in enumerate(policies):
        resolved = stored_policy(policy, adapter, prepared)
        groups.setdefault((resolved.cross_store, resolved.kv_bits, resolved.merge_mode), []).append(index)
    return list(groups.values())


def batched_inputs(prepared, rows: int) -> dict:
    """The prompt repeated for every row; audio features stay one copy (the adapter encodes them once)."""
    return {
        name: value if name == "input_features" else value.expand(rows, *value.shape[1:])
        for name, value in prepared.inputs.items()
    }


def run_cells_batched(adapter, prepared, policies: Sequence[CompressionPolicy], max_new_tokens: int):
    """Decode `prepared` under every policy at once (one batch per way of storing entries); returns (CellOutcome
    per policy, seconds of the prefill)."""
    groups = storage_groups(adapter, prepared, policies)
    if len(groups) > 1:
        outcomes: list = [None] * len(policies)
        seconds = 0.0
        for group in groups:
            part, part_seconds = run_cells_batched(adapter, prepared, [policies[i] for i in group], max_new_tokens)
            seconds += part_seconds
            for index, outcome in zip(group, part):
                outcomes[index] = outcome
        return outcomes, seconds
    session = CellBatchSession(policies, adapter, prepared)
    output = runtime.run(adapter, session, batched_inputs(prepared, len(policies)), max_new_tokens)
    seconds_prefill = output.seconds_prefill - session.seconds_compress
    return _outcomes(session, policies, output, max_new_tokens), seconds_prefill


def run_cells_replayed(adapter, prepared, record, policies: Sequence[CompressionPolicy], max_new_tokens: int):
    """Decoder-only: every row's cache filled from one recorded prefill (``record``) and compressed by its policy
    from the recorded scores, then all rows decoded together; returns a CellOutcome per policy."""
    rows = len(policies)
    groups = storage_groups(adapter, prepared, policies)
    if len(groups) > 1:
        outcomes: list = [None] * rows
        for group in groups:
            part = run_cells_replayed(adapter, prepared, record, [policies[i] for i in group], max_new_tokens)
            for index, outcome in zip(group, part):
                outcomes[index] = outcome
        return outcomes
    session = CellBatchSession(policies, adapter, prepared)
    return _outcomes(session, policies, runtime.run(adapter, session, None, max_new_tokens, record=record), max_new_tokens)


def _outcomes(session: CellBatchSession, policies, output, max_new_tokens: int):
    """One CellOutcome per row of a batched run; the batch's compress and decode seconds shared evenly."""
    share = 1.0 / len(policies)
    outcomes = []
    for row, policy in enumerate(policies):
        full = not policy.evicts
        tokens = output.tokens[row]
        outcomes.append(
            CellOutcome(
                token_ids=tokens,
                hit_token_limit=len(tokens) >= max_new_tokens,
                kv_bytes_kept=output.kept_bytes[row],
                seconds_compress=session.seconds_compress * share,
                seconds_decode=output.seconds_decode * share,
                kept_per_head={} if full else session.rows[row].summary(),
                policy=session.rows[row].policy,
            )
        )
    return outcomes
