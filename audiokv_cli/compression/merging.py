"""Evicted entries folded into kept neighbours of the same head instead of dropped (`--merge`).

Audio entries are continuous in time (the premise SSS builds on), so an evicted frame is usually close to a kept
neighbour. Each evicted entry joins the group of the kept entry before or after it in the same head, whichever key
is more similar (cosine), so groups have uneven sizes: where the selection kept few entries (silence, padding) the
groups are large, where it kept many (the speech the scores point at) they stay small.

- ``mean``: a group is stored as the mean of its keys and the mean of its values, and carries log(size) as a logit
  bias (proportional attention, as in token merging): a query then gives the group the softmax weight its members
  would have had together when their keys are alike (exact when they are equal; tests/test_quantized_cache.py).
- ``values``: kvpress's MergingPress idea, as a baseline: keys untouched, each kept value replaced by the mean of
  its group's values, no bias.

The bias is stored in float16 (two bytes per kept entry, counted in the kept bytes).
"""

from __future__ import annotations

import torch

MERGE_MODES = ("none", "mean", "values")


def merge_evicted(keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, mode: str, bias_dtype=torch.float16):
    """Packed ``[N, D]`` keys and values of the kept entries of ``keys/values [B, H, L, D]`` with every evicted
    entry of a head folded into a kept neighbour, and the ``[N]`` float16 log-size bias (None for ``values``).

    Entries are in the order `RaggedLayer.compress` packs them: segments (batch row, head) row-major, positions
    ascending. A head that kept nothing drops its entries. ``bias_dtype``: the bias's dtype (float32 when the
    caller stores the group sizes themselves).
    """
    if mode not in MERGE_MODES[1:]:
        raise ValueError(f"merge mode must be one of {', '.join(MERGE_MODES[1:])}, got {mode!r}")
    batch, heads, length, dim = keys.shape
    counts = keep.sum(-1).reshape(-1)  # [S]
    starts = torch.cumsum(counts, 0) - counts  # first packed index of each segment
    rank = torch.cumsum(keep.to(torch.long), -1) - 1  # kept entries: own index in segment; evicted: the left one's
    segment_start = starts.view(batch, heads, 1)
    segment_count = counts.view(batch, heads, 1)
    left = rank.clamp(min=0)
    right = torch.minimum(rank + 1, (segment_count - 1).clamp(min=0))
    rows, kv_heads, positions = keep.nonzero(as_tuple=True)
    kept_keys = keys[rows, kv_heads, positions].float()
    # Cosine similarity of each entry's key to its left and right kept neighbours' keys.
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    kept_unit = torch.nn.functional.normalize(kept_keys, dim=-1)
    flat_left = (segment_start + left).clamp(max=max(int(counts.sum()) - 1, 0))
    flat_right = (segment_start + right).clamp(max=max(int(counts.sum()) - 1, 0))
    if kept_unit.shape[0] == 0:
        empty = keys.new_zeros(0, dim)
        return empty, values.new_zeros(0, dim), None if mode == "values" else torch.zeros(0, dtype=torch.float16)
    similar_left = (unit * kept_unit[flat_left]).sum(-1)
    similar_right = (unit * kept_unit[flat_right]).sum(-1)
    before_first = rank < 0  # evicted entries before a head's first kept entry can only go right
    go_right = (~keep) & ((similar_right > similar_left) | before_first)
    target = torch.where(go_right, flat_right, flat_left)
    has_group = segment_count.expand_as(keep) > 0
    target, members = target[has_group], has_group
    total = int(counts.sum())
    group_size = torch.bincount(target, minlength=total).to(torch.float32)
    merged_values = torch.zeros(total, dim, dtype=torch.float32, device=values.device)
    merged_values.index_add_(0, target, values[members].float())
    merged_values /= group_size[:, None]
    if mode == "values":
        return keys[rows, kv_heads, positions].contiguous(), merged_values.to(values.dtype), None
    merged_keys = torch.zeros(total, dim, dtype=torch.float32, device=keys.device)
    merged_keys.index_add_(0, target, keys[members].float())
    merged_keys /= group_size[:, None]
    return merged_keys.to(keys.dtype), merged_values.to(values.dtype), group_size.log().to(bias_dtype)
