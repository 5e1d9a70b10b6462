"""Per-head KV budgets: how many prompt entries each (layer, KV head) keeps, the forced positions included.

All allocators start from the same nominal per-head budget, round(retention * L) clamped to [f, L] where f counts
the forced positions (the observation window; under scope audio every text token too), and differ only in how they
move the evictable rest between layers and heads. Totals are conserved exactly in integers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from os import PathLike
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from audiokv_cli.compression.scorers import _build
from audiokv_cli.compression.selection import forced_mask
from audiokv_cli.errors import AudiokvError


@dataclass(frozen=True)
class BudgetContext:
    """One prompt's budget setting. The scope and audio spans decide which positions are forced (always kept);
    every allocator counts the forced positions inside each head's budget, so the retention target holds."""

    retention: float
    prompt_len: int
    window: int = 32
    num_layers: int = 1
    num_kv_heads: int = 1
    num_query_heads: int = 1
    scope: str = "all"
    audio_spans: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.retention <= 1.0:
            raise AudiokvError(f"retention must be in [0, 1], got {self.retention}")
        if self.prompt_len < 0 or self.window < 0:
            raise AudiokvError("prompt length and window must be >= 0")
        if self.num_layers < 1 or self.num_kv_heads < 1 or self.num_query_heads < 1:
            raise AudiokvError("layer and head counts must be >= 1")
        if self.num_query_heads % self.num_kv_heads:
            raise AudiokvError(
                f"{self.num_query_heads} query heads cannot be grouped over {self.num_kv_heads} KV heads"
            )

    @property
    def effective_window(self) -> int:
        return min(self.window, self.prompt_len)

    @functools.cached_property
    def forced(self) -> Tensor:
        """bool[L]: the positions every head keeps (the window; under scope audio every non-audio token too)."""
        return forced_mask(self.prompt_len, self.window, list(self.audio_spans), self.scope)

    @functools.cached_property
    def num_forced(self) -> int:
        return int(self.forced.sum())

    @property
    def per_head(self) -> int:
        """Entries each head keeps on average: round(retention x L), never fewer than the forced positions."""
        # Round half up (not Python's banker's rounding) so budgets do not flip with the parity of the count.
        nominal = math.floor(self.retention * self.prompt_len + 0.5)
        return max(self.num_forced, min(nominal, self.prompt_len))

    @property
    def group_size(self) -> int:
        return self.num_query_heads // self.num_kv_heads


@runtime_checkable
class BudgetAllocator(Protocol):
    name: str

    def allocate(self, layer: int, scores: Tensor | None, ctx: BudgetContext) -> Tensor:
        """Budgets LongTensor[Hkv] for one layer; `scores` [B=1, Hkv, L] when the allocator needs them."""
        ...


def largest_remainder(shares: Tensor, total: int) -> Tensor:
    """Round non-negative real shares [N] to integers that sum to `total` exactly.

    Every entry gets floor(share); the leftover units go to the largest fractional parts, ties to the lower index.
    So a larger share never rounds to fewer units than a smaller one.
    """
    shares = shares.to(torch.float64)
    base = torch.floor(shares)
    leftover = int(total - int(base.sum().item()))
    if leftover < 0 or leftover > shares.numel():
        raise AudiokvError("internal budget error: shares do not add up to the total")  # a bug, not user input
    order = torch.sort(shares - base, descending=True, stable=True).indices
    extra = torch.zeros_like(base)
    extra[order[:leftover]] = 1.0
    return (base + extra).to(torch.long)


def _device_of(scores: Tensor | None) -> torch.device:
    return scores.device if scores is not None else torch.device("cpu")


def _check_layer(layer: int, ctx: BudgetContext) -> None:
    if not 0 <= layer < ctx.num_layers:
        raise AudiokvError(f"layer {layer} is outside the model's {ctx.num_layers} layers")


@dataclass
class UniformBudget:
    """Every head of every layer keeps the nominal per-head budget (SnapKV)."""

    name: str = dataclasses.field(default="uniform", init=False)

    def allocate(self, layer: int, scores: Tensor | None, ctx: BudgetContext) -> Tensor:
        _check_layer(layer, ctx)
        return torch.full((ctx.num_kv_heads,), ctx.per_head, dtype=torch.long, device=_device_of(scores))


@dataclass
class PyramidBudget:
    """PyramidKV: layer budgets shrink linearly with depth, uniform across the heads of a layer.

    Schedule from PyramidKV (Cai et al. 2024, arXiv 2406.02069; KVCache-Factory pyramidkv_utils.py): with
    m = per_head - f evictable entries per head (f forced positions), the last layer keeps min = m // beta and the
    first max = 2m - min (capped at L - f, min raised to keep the mean), linearly in between. Their integer step drops
    entries; here the real-valued line is rounded by largest remainder so the sum over layers is exactly
    num_layers * per_head, and the ordering stays non-increasing with depth.
    """

    beta: int = 20
    name: str = dataclasses.field(default="pyramid", init=False)

    def __post_init__(self) -> None:
        if self.beta < 1:
            raise AudiokvError(f"pyramid beta must be >= 1, got {self.beta}")

    def layer_budgets(self, ctx: BudgetContext) -> Tensor:
        """LongTensor[num_layers]: the per-head budget of each layer."""
        forced = ctx.num_forced
        evictable = ctx.per_head - forced
        layers = ctx.num_layers
        if layers == 1 or evictable == 0:
            return torch.full((layers,), ctx.per_head, dtype=torch.long)
        low = evictable // self.beta
        high = 2 * evictable - low
        if high > ctx.prompt_len - forced:
            high = ctx.prompt_len - forced
            low = 2 * evictable - high
        depth = torch.arange(layers, dtype=torch.float64) / (layers - 1)
        line = high - (high - low) * depth  # mean is exactly (high + low) / 2 = evictable
        return largest_remainder(line, layers * evictable) + forced

    def allocate(self, layer: int, scores: Tensor | None, ctx: BudgetContext) -> Tensor:
        _check_layer(layer, ctx)
        per_head = int(self.layer_budgets(ctx)[layer])
        return torch.full((ctx.num_kv_heads,), per_head, dtype=torch.long, device=_device_of(scores))


@dataclass
class AdaptiveBudget:
    """AdaKV: layer-local head budgets from the layer's own scores.

    The layer's total Hkv * per_head is conserved. Each head first gets a safeguard floor max(f, floor * per_head)
    made of its f forced positions plus its best other positions (what selection keeps first); the rest of the layer's pool
    goes to the globally highest remaining scores across heads, and a head's budget is its floor plus its wins.
    """

    floor: float = 0.2
    name: str = dataclasses.field(default="adaptive", init=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.floor <= 1.0:
            raise AudiokvError(f"adaptive floor must be in [0, 1], got {self.floor}")

    def floor_budget(self, ctx: BudgetContext) -> int:
        return min(ctx.per_head, max(ctx.num_forced, math.floor(self.floor * ctx.per_head)))

    def allocate_batch(self, layer: int, scores: Tensor, ctx: BudgetContext) -> Tensor:
        """Budgets LongTensor[B, Hkv] for scores [B, Hkv, L]."""
        _check_layer(layer, ctx)
        if scores is None:
            raise AudiokvError("adaptive budgets need the layer's scores")
        batch, heads, length = scores.shape
        if heads != ctx.num_kv_heads or length != ctx.prompt_len:
            raise AudiokvError(f"scores shape {tuple(scores.shape)} does not match the budget context")
        floor = self.floor_budget(ctx)
        pool = heads * (ctx.per_head - floor)
        # Real scores are squashed into the finite range so +-inf below can only mean "forced" / "already in floor".
        finite = torch.finfo(torch.float32)
        ranked = torch.nan_to_num(scores.to(torch.float32), nan=finite.min, posinf=finite.max, neginf=finite.min)
        # Forced positions are always kept, so they are part of every head's floor set.
        ranked = ranked.masked_fill(ctx.forced.to(ranked.device), float("inf"))
        order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
        in_floor = torch.zeros_like(ranked, dtype=torch.bool).scatter_(
            -1, order[..., :floor], torch.ones_like(order[..., :floor], dtype=torch.bool)
        )
        candidates = ranked.masked_fill(in_floor, float("-inf")).reshape(batch, heads * length)
        winners = torch.sort(candidates, dim=-1, descending=True, stable=True).indices[:, :pool]
        counts = torch.zeros(batch, heads * length, dtype=torch.long, device=scores.device)
        counts.scatter_(1, winners, 1)
        return counts.reshape(batch, heads, length).sum(dim=-1) + floor

    def allocate(self, layer: int, scores: Tensor | None, ctx: BudgetContext) -> Tensor:
        if scores is None:
            raise AudiokvError("adaptive budgets need the layer's scores")
        if scores.dim() != 3 or scores.shape[0] != 1:
            raise AudiokvError("allocate takes scores [1, Hkv, L]; use allocate_batch for larger batches")
        return self.allocate_batch(layer, scores, ctx)[0]


def load_profile_scores(path: str | PathLike) -> Tensor:
    """Read a head profile: a safetensors file with a tensor named "score" [num_layers, num_query_heads]."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, ValueError, SafetensorError) as exc:
        raise AudiokvError(f"cannot read head profile {path}: {exc}") from exc
    if "score" not in tensors:
        raise AudiokvError(f"head profile {path} has no tensor named 'score'")
    return tensors["score"]


def profile_budget_table(
    head_scores: Tensor, ctx: BudgetContext, floor_fraction: float = 0.5
) -> Tensor:
    """AudioKV eq. 1 over all layers and KV heads at once: LongTensor[num_layers, Hkv].

    head_scores [num_layers, num_query_heads] is summed within each GQA group (query head h -> KV head h // G).
    Each head gets its f forced positions (the window w; under scope audio the text too) plus a floor
    r = floor(floor_fraction * (per_head - f)); the rest of the total
    num_layers * Hkv * per_head is shared in proportion to the scores. A head that would pass L is capped at L and
    its excess shared again among the others (water-filling); integers come from largest remainder, so the
    total is exact. All-zero scores (or all-zero among the heads still open) share the pool evenly.
    """
    expected = (ctx.num_layers, ctx.num_query_heads)
    if tuple(head_scores.shape) != expected:
        raise AudiokvError(
            f"head profile has shape {tuple(head_scores.shape)}, the model needs {expected} (layers x query heads)"
        )
    scores = head_scores.detach().to("cpu", torch.float64)
    if not torch.isfinite(scores).all() or (scores < 0).any():
        raise AudiokvError("head profile scores must be finite and non-negative")
    kv_scores = scores.view(ctx.num_layers, ctx.num_kv_heads, ctx.group_size).sum(dim=-1).flatten()

    num_heads = kv_scores.numel()
    forced = ctx.num_forced
    base = forced + math.floor(floor_fraction * (ctx.per_head - forced))
    pool = num_heads * (ctx.per_head - base)
    room = ctx.prompt_len - base  # how much score share a head can take before hitting L

    shares = torch.zeros(num_heads, dtype=torch.float64)
    open_heads = torch.ones(num_heads, dtype=torch.bool)
    remaining = float(pool)
    while True:
        weights = torch.where(open_heads, kv_scores, torch.zeros_like(kv_scores))
        if weights.sum() <= 0:
            weights = open_heads.to(torch.float64)  # nothing to prefer: share evenly
        proposal = remaining * weights / weights.sum()
        over = open_heads & (proposal > room)
        if not over.any():
            shares = torch.where(open_heads, proposal, shares)
            break
        shares[over] = float(room)
        remaining -= float(room) * int(over.sum())
        open_heads &= ~over
    extra = largest_remainder(shares, pool)
    return (extra + base).view(ctx.num_layers, ctx.num_kv_heads)


# Under sensitivity budgets no head keeps fewer than this share of the mean evictable budget, nor (where the mean
# allows) fewer than one entry per largest measured strength: outside that range nothing was measured. 0.5 against
# 0.25 on the development sets (Whisper base, docs/results.md section 0): TTS 6.2 / 6.6 % WER at budgets 0.05 /
# 0.025 instead of 5.6 / 17.6; human 0.7 / 2.7 instead of 0.7 / 1.4.
SENSITIVITY_FLOOR = 0.5
# Candidate budgets per head on which each head's cost curve is evaluated (geometric in the merge ratio).
SENSITIVITY_GRID = 96


def _lower_hull(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The lower convex hull of (n, cost) points sorted by n (monotone chain)."""
    hull: list[tuple[int, float]] = []
    for point in points:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            # Drop the middle point when it lies on or above the chord from hull[-2] to the new point.
            if (y2 - y1) * (point[0] - x1) >= (point[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(point)
    return hull


def head_cost_curves(sensitivity: Tensor, strengths: Sequence[int], evictable: int, counts: Tensor) -> Tensor:
    """Predicted cost [heads, len(counts)] of each head keeping ``counts`` of its ``evictable`` entries (the rest merged).

    The measured cost of one head merged g:1 is interpolated linearly in log g between the strengths (cost 0 at
    g = 1, i.e. every entry kept), non-decreasing in g (measurement noise aside, merging more never helps), and
    continued past the largest strength with the last slope.
    """
    table = torch.cummax(sensitivity.to(torch.float64).clamp(min=0.0), dim=-1).values
    heads = table.shape[0]
    knots = torch.log(torch.tensor([1.0, *[float(g) for g in strengths]], dtype=torch.float64))
    values = torch.cat([torch.zeros(heads, 1, dtype=torch.float64), table], dim=1)
    ratio = torch.log(evictable / counts.to(torch.float64).clamp(min=1.0))  # log g of each candidate count
    segment = (torch.searchsorted(knots, ratio, right=True) - 1).clamp(0, knots.numel() - 2)
    left, right = knots[segment], knots[segment + 1]
    slope = (values[:, segment + 1] - values[:, segment]) / (right - left)
    return values[:, segment] + slope * (ratio - left)


def sensitivity_budget_table(
    sensitivity: Tensor, strengths: Sequence[int], ctx: BudgetContext, floor_fraction: float = SENSITIVITY_FLOOR
) -> Tensor:
    """Per-head budgets LongTensor[num_layers, Hkv] that minimize the summed predicted cost of merging each head
    (``sensitivity`` [num_layers, Hkv, len(strengths)]: the cost of one head alone merged g:1), with the same total as
    uniform budgets: num_layers * Hkv * per_head entries, so the same bytes.

    Every head keeps its forced positions; the evictable rest moves between heads. Each head's cost as a function of
    its kept count is replaced by its lower convex hull, and the pool goes to the hull segments that save most cost
    per entry (exact for convex costs, the greedy marginal rule); segments of equal gain share what is left in
    proportion to their lengths. A head keeps at least ``floor_fraction`` of the mean evictable budget and never
    more than all its entries.
    """
    expected = (ctx.num_layers, ctx.num_kv_heads, len(strengths))
    if tuple(sensitivity.shape) != expected:
        raise AudiokvError(
            f"sensitivity table has shape {tuple(sensitivity.shape)}, the model needs {expected} "
            "(layers x KV heads x strengths)"
        )
    forced = ctx.num_forced
    evictable = ctx.prompt_len - forced
    mean = ctx.per_head - forced  # evictable entries each head keeps on average
    heads = ctx.num_layers * ctx.num_kv_heads
    uniform = torch.full((ctx.num_layers, ctx.num_kv_heads), ctx.per_head, dtype=torch.long)
    if mean <= 0 or mean >= evictable:
        return uniform
    lower = max(math.floor(floor_fraction * mean), min(mean, math.ceil(evictable / max(strengths))))
    if lower >= mean:
        return uniform
    ratios = torch.logspace(0.0, math.log10(evictable / lower), SENSITIVITY_GRID, dtype=torch.float64)
    counts = torch.unique(torch.cat([
        torch.round(evictable / ratios).to(torch.long), torch.tensor([lower, evictable])
    ])).clamp(lower, evictable)
    counts = torch.unique(counts)
    costs = head_cost_curves(sensitivity.reshape(heads, -1).cpu(), strengths, evictable, counts)
    # A vanishing cost per merged entry for every head, so heads the table cannot tell apart (all zero, or equal)
    # still have strictly convex curves and share evenly instead of by index.
    scale = float(costs.abs().max()) or 1.0
    costs = costs + 1e-9 * scale * torch.log(evictable / counts.to(torch.float64))
    segments: list[tuple[float, int, int]] = []  # (cost saved per entry, head, entries)
    for head in range(heads):
        hull = _lower_hull(list(zip(counts.tolist(), costs[head].tolist())))
        for (n0, c0), (n1, c1) in zip(hull, hull[1:]):
            segments.append(((c0 - c1) / (n1 - n0), head, n1 - n0))
    extra = [0] * heads
    pool = heads * (mean - lower)
    segments.sort(key=lambda segment: -segment[0])
    index = 0
    while pool > 0 and index < len(segments):
        gain, end = segments[index][0], index + 1
        while end < len(segments) and segments[end][0] >= gain * (1 - 1e-9):
            end += 1
        tied, index = segments[index:end], end
        lengths = [length for _, _, length in tied]
        if sum(lengths) <= pool:
            given = lengths
        else:
            shares = torch.tensor(lengths, dtype=torch.float64) * (pool / sum(lengths))
            given = largest_remainder(shares, pool).tolist()
        for (_, head, _), count in zip(tied, given):
            extra[head] += count
        pool -= sum(given)
    return (torch.tensor(extra, dtype=torch.long) + lower + forced).view(ctx.num_layers, ctx.num_kv_heads)


@dataclass(eq=False)
class ProfileBudget:
    """AudioKV: per-head budgets from an offline head profile.

    Without a sensitivity table, AudioKV eq. 1: audio-critical heads (by ``head_scores``) get more. With one
    (``sensitivity`` [layers, Hkv, strengths], the cost of merging one head alone at each of ``strengths``), the
    heads that cost least to merge keep fewest entries, within the same total (`sensitivity_budget_table`).
    """

    head_scores: Tensor
    floor_fraction: float = 0.5
    sensitivity: Tensor | None = None
    strengths: tuple[int, ...] = ()
    name: str = dataclasses.field(default="profile", init=False)
    _tables: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.floor_fraction <= 1.0:
            raise AudiokvError(f"profile floor_fraction must be in [0, 1], got {self.floor_fraction}")
        if not isinstance(self.head_scores, Tensor):
            self.head_scores = load_profile_scores(self.head_scores)
        if self.head_scores.dim() != 2:
            raise AudiokvError("head profile must be a 2-D [layers, query heads] tensor")
        if self.sensitivity is not None:
            self.strengths = tuple(int(g) for g in self.strengths)
            if self.sensitivity.dim() != 3 or self.sensitivity.shape[-1] != len(self.strengths):
                raise AudiokvError("a sensitivity table is [layers, KV heads, strengths] with its strengths listed")

    @classmethod
    def from_file(
        cls,
        path: str | PathLike,
        floor_fraction: float = 0.5,
        loader: Callable[[str | PathLike], Tensor] = load_profile_scores,
    ) -> "ProfileBudget":
        return cls(loader(path), floor_fraction=floor_fraction)

    def table(self, ctx: BudgetContext) -> Tensor:
        """LongTensor[num_layers, Hkv], computed once per budget context and cached."""
        if ctx not in self._tables:
            if self.sensitivity is not None:
                self._tables[ctx] = sensitivity_budget_table(self.sensitivity, self.strengths, ctx)
            else:
                self._tables[ctx] = profile_budget_table(self.head_scores, ctx, self.floor_fraction)
        return self._tables[ctx]

    def for_layers(self, head_scores: Tensor, layers: Sequence[int]) -> "ProfileBudget":
        """This budget over the cache-owning ``layers`` only, with their (summed) ``head_scores``."""
        sensitivity = None if self.sensitivity is None else self.sensitivity[list(layers)]
        return ProfileBudget(head_scores, self.floor_fraction, sensitivity, self.strengths)

    def without_sensitivity(self) -> "ProfileBudget":
        """This budget from the attention profile alone (AudioKV eq. 1)."""
        return ProfileBudget(self.head_scores, self.floor_fraction)

    def with_floor(self, floor_fraction: float) -> "ProfileBudget":
        return ProfileBudget(self.head_scores, floor_fraction, self.sensitivity, self.strengths)

    def allocate(self, layer: int, scores: Tensor | None, ctx: BudgetContext) -> Tensor:
        _check_layer(layer, ctx)
        return self.table(ctx)[layer].to(_device_of(scores))


_BUDGETS = {
    "uniform": UniformBudget,
    "pyramid": PyramidBudget,
    "adaptive": AdaptiveBudget,
    "profile": ProfileBudget,
}

BUDGET_NAMES = tuple(_BUDGETS)


def make_budget(name: str, **params) -> BudgetAllocator:
    """Build a budget allocator by short name (uniform, pyramid, adaptive, profile) with its parameters.

    `profile` needs head_scores: a [layers, query heads] tensor or a path to a profile file.
    """
    if name == "profile" and "head_scores" not in params:
        raise AudiokvError("the profile budget needs a head profile (head_scores tensor or file path)")
    return _build(_BUDGETS, "budget", name, params)
