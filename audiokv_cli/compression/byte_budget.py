"""The byte budget (`--kv-budget F`): the kept prompt cache may take at most F x its size at 16 bits per element.

`kv_bytes_full_16bit` counts the entries audiokv compresses (a decoder-only model's prompt; an encoder-decoder's
cross-attention frames, all 1,500 of Whisper's window), every compressed layer and KV head, keys and values, at two
bytes per element. `kv_bytes_kept` counts everything allocated for the kept entries: codes or values, scales and
minimums, each head's length and any per-entry extras (`cache.RaggedKVCache.kept_bytes`).

A budget is spent on entries and bits. Which bits is read from a frontier measured on development sets
(`assets/frontier.json`, one table per cache type, docs/results.md); the number of entries is then the largest that
fits, from the exact byte cost of an entry at those bits (`entries_within`), so the budget always holds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from functools import lru_cache
from importlib import resources

from audiokv_cli.compression.quantization import BITS, SCALE_BYTES, QuantConfig
from audiokv_cli.errors import AudiokvError, AudiokvWarning

# Bytes of each head's entry count (int64), one per (batch row, layer, KV head).
LENGTH_BYTES = 8
# A merged entry's float16 logit bias.
BIAS_BYTES = 2
# Frames per merged group past which Whisper's transcripts were measured to break (docs/compression.md: similarity
# groups held at 6 frames on average and broke at 8).
MERGE_CLIFF = 6.0


class CoarseMergeWarning(AudiokvWarning):
    """A byte budget that merges the encoder's frames past the measured cliff."""


def full_bytes_16bit(entries: int, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of ``entries`` positions of a dense cache at 16 bits: keys and values, every layer and KV head."""
    return 2 * 2 * entries * num_layers * num_kv_heads * head_dim


def segment_cost(
    entries: float, head_dim: int, bits: int, per_token_keys: bool = False, extra_per_entry: int = 0
) -> float:
    """An upper bound of the bytes one head's segment of ``entries`` kept entries takes at ``bits``
    (``extra_per_entry``: bytes every entry also carries, such as a merged entry's logit bias)."""
    if bits == 16:
        return entries * (2 * head_dim * 2 + extra_per_entry) + LENGTH_BYTES
    config = QuantConfig(bits)
    cost = entries * (config.entry_bytes(head_dim, per_token_keys) + extra_per_entry) + LENGTH_BYTES
    if not per_token_keys:
        # Key scales per channel for every group of key_group entries; a head's last group may be partial.
        cost += (entries / config.key_group + 1) * head_dim * SCALE_BYTES
    return cost


def entries_within(
    budget: float, length: int, head_dim: int, bits: int, per_token_keys: bool = False, extra_per_entry: int = 0
) -> int:
    """The most entries per head (on average) whose segments cost at most ``budget`` x the 16-bit segment."""
    allowed = budget * full_bytes_16bit(length, 1, 1, head_dim)
    low, high = 0, length
    if segment_cost(0, head_dim, bits, per_token_keys, extra_per_entry) > allowed:
        return -1
    while low < high:  # the cost grows with the entries: the largest count within the allowance
        middle = (low + high + 1) // 2
        if segment_cost(middle, head_dim, bits, per_token_keys, extra_per_entry) <= allowed:
            low = middle
        else:
            high = middle - 1
    return low


@lru_cache(maxsize=None)
def frontier() -> dict:
    """The shipped table: per cache type ("cross", "self"), budget thresholds and the bits measured best there."""
    text = resources.files("audiokv_cli").joinpath("assets/frontier.json").read_text()
    return json.loads(text)


def table_row(budget: float, cache_type: str) -> dict:
    """The frontier table's row for ``budget`` on a cache of ``cache_type``: bits, and what evicted entries become."""
    rows = frontier()[cache_type]["bits"]
    return next((row for row in rows if budget >= row["from_budget"]), rows[-1])


def table_bits(budget: float, cache_type: str) -> int:
    return int(table_row(budget, cache_type)["bits"])


def table_merge(budget: float, cache_type: str) -> str:
    return table_row(budget, cache_type).get("merge", "none")


def latent_cost(frames: int, dim: int, bits: int, merged: bool) -> int:
    """Bytes of ``frames`` rows of a ``dim``-wide encoder output at ``bits`` (per-token codes, float16 scale and
    minimum per group of channels; `latent.LatentStore.row_bytes`), a logit bias per row when frames were merged."""
    if bits == 16:
        per_frame = dim * 2
    else:
        config = QuantConfig(bits)
        per_frame = dim * bits // 8 + dim // config.value_group_for(dim) * SCALE_BYTES
    return frames * (per_frame + (BIAS_BYTES if merged else 0)) + LENGTH_BYTES


def resolve_latent(policy, *, frames: int, dim: int, full_16bit: int):
    """``policy`` spending its ``kv_budget`` on the encoder output kept once (``--cross-store latent``).

    Bits: the policy's own when set, else the first of the frontier table's ``latent`` bits at which at least
    ``min_retention`` of the frames fit (every frame when they all fit, else the most that fit, merged), else its
    last bits with the frames merged into the most groups that fit. Refused in one line when not one frame fits."""
    allowed = policy.kv_budget * full_16bit
    table = frontier()["latent"]
    choices = [policy.kv_bits] if policy.kv_bits is not None else list(table["bits"])
    floor = float(table.get("min_retention", 1.0)) if policy.kv_bits is None else 1.0
    merge = policy.merge or "mean"
    for index, bits in enumerate(choices):
        if latent_cost(frames, dim, bits, merged=False) <= allowed:
            return dataclasses.replace(policy, retention=1.0, kv_bits=bits, merge=policy.merge or "none")
        per_frame = latent_cost(1, dim, bits, merge == "mean") - LENGTH_BYTES
        kept = min(frames - 1, int((allowed - LENGTH_BYTES) // per_frame))
        if kept >= floor * frames or index == len(choices) - 1:
            break
    if kept < 1:
        raise AudiokvError(
            f"--kv-budget {policy.kv_budget:g} cannot hold one encoder frame at {bits} bits; raise the budget"
        )
    if not policy.evicts:
        raise AudiokvError(
            f"--kv-budget {policy.kv_budget:g} is too small to keep every encoder frame (method {policy.name!r}) at "
            f"{bits} bits; choose an evicting method or a larger budget"
        )
    if merge == "mean" and frames / kept > MERGE_CLIFF:
        warnings.warn(
            f"--kv-budget {policy.kv_budget:g} merges the encoder frames {frames / kept:.0f}:1; past about "
            f"{MERGE_CLIFF:.0f} frames per group Whisper's transcripts break (docs/compression.md)",
            CoarseMergeWarning, stacklevel=2,
        )
    return dataclasses.replace(policy, retention=kept / frames, kv_bits=bits, merge=merge)


def check_budget(budget: float) -> float:
    if not 0.0 < budget <= 1.0 or math.isnan(budget):
        raise AudiokvError(f"--kv-budget must be in (0, 1], got {budget}")
    return budget


def resolve(policy, *, length: int, head_dim: int, forced: int, cross_attention: bool, sliding: bool = False):
    """``policy`` with the retention and bits that spend its ``kv_budget`` on a prompt of ``length`` entries.

    Bits: the policy's own when set, else the frontier table's for this cache type (then fewer bits while the
    forced entries alone would not fit); merging: the policy's own when set, else the table's. A method that evicts nothing keeps every entry: the bits are the most that
    fit. Refused in one line when nothing fits.
    """
    budget = policy.kv_budget
    cache_type = "cross" if cross_attention else "self"
    if not policy.evicts:
        choices = [policy.kv_bits] if policy.kv_bits is not None else list(BITS)
        for bits in choices:
            if entries_within(budget, length, head_dim, bits, sliding) >= length:
                return dataclasses.replace(policy, retention=1.0, kv_bits=bits)
        raise AudiokvError(
            f"--kv-budget {budget:g} is too small to keep every entry (method {policy.name!r}) even at "
            f"{choices[-1]} bits; choose an evicting method or a larger budget"
        )
    if policy.kv_bits is not None:
        choices = [policy.kv_bits]
    else:
        first = table_bits(budget, cache_type)
        choices = [bits for bits in BITS if bits <= first]
    merge = policy.merge if policy.merge is not None else table_merge(budget, cache_type)
    extra = BIAS_BYTES if merge == "mean" and not sliding else 0
    for bits in choices:
        entries = entries_within(budget, length, head_dim, bits, sliding, extra)
        if entries >= max(forced, 1):
            return dataclasses.replace(policy, retention=entries / length, kv_bits=bits, merge=merge)
    raise AudiokvError(
        f"--kv-budget {budget:g} cannot hold the {max(forced, 1)} entries per head this method always keeps "
        f"(prompt of {length}) at {choices[-1]} bits; raise the budget"
    )
