"""Every cell of one clip decoded at once: one batch row per policy, all rows the same prompt.

For an encoder-decoder (Whisper) the audio cache is the cross-attention over the encoder frames. The encoder runs
once; each batch row then compresses its own copy of the cross-attention cache with its own policy (per-row
segments of the ragged cache) and all rows decode greedily in lockstep. A decode step reads the weights once for
the whole batch, so a sweep of N cells costs little more than one cell. Rows never see each other: every row's
attention, budgets and selection are its own, so its tokens are those of a single-row run (tested).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from audiokv_cli.attention import use_attention_handler
from audiokv_cli.compression.policy import CompressionPolicy, CompressionSession, LayerKeepStats
from audiokv_cli.decoding import decode_greedy_rows, prefill


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

    def compress_layer(self, layer_idx: int, queries, keys, scaling: float, scores=None) -> None:
        start = time.perf_counter()
        keep = torch.ones(keys.shape[:-1], dtype=torch.bool, device=keys.device)
        audio = self.audio_position_mask(keep.shape[-1], keep.device)
        for row, session in enumerate(self.rows):
            if session.policy.evicts:
                mask = session.policy.keep_mask(
                    layer_idx, queries[row : row + 1], keys[row : row + 1], scaling, session.context
                )
                keep[row] = mask[0]
            session.layer_stats[layer_idx] = LayerKeepStats(
                kept=keep[row].sum(-1).tolist(),
                audio_kept=(keep[row] & audio).sum(-1).tolist(),
                text_kept=(keep[row] & ~audio).sum(-1).tolist(),
            )
        self.cache.compress_layer(layer_idx, keep)
        self.seconds_compress += time.perf_counter() - start

    def kept_bytes(self, row: int) -> int:
        """Bytes of row `row`'s kept entries (keys and values, every layer and head)."""
        geometry = self.adapter.geometry
        element = torch.empty((), dtype=self.adapter.dtype).element_size()
        kept = sum(sum(stats.kept) for stats in self.rows[row].layer_stats.values())
        return 2 * kept * geometry.head_dim * element


def batched_inputs(prepared, rows: int) -> dict:
    """The prompt repeated for every row; audio features stay one copy (the adapter encodes them once)."""
    return {
        name: value if name == "input_features" else value.expand(rows, *value.shape[1:])
        for name, value in prepared.inputs.items()
    }


def run_cells_batched(adapter, prepared, policies: Sequence[CompressionPolicy], max_new_tokens: int):
    """Decode `prepared` under every policy at once; returns (CellOutcome per policy, seconds of the prefill)."""
    from audiokv_cli.evaluation.sweep import CellOutcome

    session = CellBatchSession(policies, adapter, prepared)
    with use_attention_handler(adapter, session), torch.no_grad():
        logits, seconds = prefill(adapter, batched_inputs(prepared, len(policies)), session.model_cache)
        seconds_prefill = seconds - session.seconds_compress
        tokens, seconds_decode = decode_greedy_rows(adapter, session.model_cache, logits, max_new_tokens)
    share = 1.0 / len(policies)
    outcomes = []
    for row, policy in enumerate(policies):
        full = not policy.evicts
        outcomes.append(
            CellOutcome(
                token_ids=tokens[row],
                hit_token_limit=len(tokens[row]) >= max_new_tokens,
                kv_bytes_kept=session.kept_bytes(row),
                seconds_compress=session.seconds_compress * share,
                seconds_decode=seconds_decode * share,
                kept_per_head={} if full else session.rows[row].summary(),
            )
        )
    return outcomes, seconds_prefill
