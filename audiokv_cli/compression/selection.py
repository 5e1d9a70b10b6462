"""Which prompt positions each KV head keeps, given scores, per-head budgets and always-kept positions."""

from __future__ import annotations

import torch
from torch import Tensor

from audiokv_cli.errors import AudiokvError

SCOPES = ("all", "audio")


def forced_mask(
    length: int, window: int, audio_spans: list[tuple[int, int]] | None = None, scope: str = "all"
) -> Tensor:
    """bool[L]: positions every head keeps whatever the scores say.

    Always the last `window` positions (the observation window). Under scope "audio" only audio tokens are
    evictable, so every position outside `audio_spans` ([start, end) token ranges) is forced too;
    no spans then means nothing is evictable.
    """
    if scope not in SCOPES:
        raise AudiokvError(f"unknown eviction scope {scope!r}; choose one of: {', '.join(SCOPES)}")
    if length < 0 or window < 0:
        raise AudiokvError("prompt length and window must be >= 0")
    forced = torch.zeros(length, dtype=torch.bool)
    forced[length - min(window, length) :] = True
    if scope == "audio":
        forced |= ~audio_mask(length, audio_spans)
    return forced


def audio_mask(length: int, audio_spans: list[tuple[int, int]] | None, device=None) -> Tensor:
    """bool[L]: True at the positions inside the [start, end) audio spans."""
    audio = torch.zeros(length, dtype=torch.bool, device=device)
    for start, end in audio_spans or []:
        if not 0 <= start <= end <= length:
            raise AudiokvError(f"audio span [{start}, {end}) lies outside the {length}-token prompt")
        audio[start:end] = True
    return audio


def select_positions(scores: Tensor, budgets: Tensor, forced: Tensor) -> Tensor:
    """Keep mask [..., Hkv, L] for scores [..., Hkv, L], budgets [..., Hkv] and forced bool [L] (or [..., L]).

    Per head: every forced position, then the highest-scoring other positions until the head holds exactly
    budgets[h] entries (all forced ones if they alone exceed the budget; at most L). Equal scores go to the
    lower position; NaN scores rank last. One stable sort for all heads.
    """
    length = scores.shape[-1]
    if budgets.shape != scores.shape[:-1]:
        raise AudiokvError(f"budgets shape {tuple(budgets.shape)} does not match scores {tuple(scores.shape)}")
    forced = forced.to(device=scores.device, dtype=torch.bool)
    if forced.shape[-1] != length:
        raise AudiokvError(f"forced mask has length {forced.shape[-1]}, scores have {length}")
    finite = torch.finfo(torch.float32)
    # Squash real scores into the finite range so +inf is reserved for forced positions.
    priority = torch.nan_to_num(scores.to(torch.float32), nan=finite.min, posinf=finite.max, neginf=finite.min)
    priority = priority.masked_fill(forced, float("inf"))
    order = torch.sort(priority, dim=-1, descending=True, stable=True).indices
    num_forced = forced.expand_as(priority).sum(dim=-1)
    keep_count = torch.maximum(budgets.to(device=scores.device, dtype=torch.long), num_forced).clamp(0, length)
    ranks = torch.arange(length, device=scores.device)
    taken = ranks < keep_count.unsqueeze(-1)
    return torch.zeros_like(taken).scatter_(-1, order, taken)
