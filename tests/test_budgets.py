import math
import random
from fractions import Fraction

import pytest
import torch
from safetensors.torch import save_file

from audiokv_cli.compression.budgets import (
    AdaptiveBudget,
    BudgetContext,
    ProfileBudget,
    PyramidBudget,
    UniformBudget,
    largest_remainder,
    make_budget,
)
from audiokv_cli.errors import AudiokvError


def random_contexts(count, seed=0):
    rng = random.Random(seed)
    edge = [
        BudgetContext(0.1, 100, 32, 4, 2, 4),  # retention * L < w
        BudgetContext(1.0, 77, 32, 5, 3, 6),  # keep everything
        BudgetContext(0.5, 20, 32, 3, 2, 2),  # L < w
        BudgetContext(0.0, 50, 8, 3, 2, 4),
        BudgetContext(0.4, 1, 32, 2, 1, 1),
        BudgetContext(0.3, 40, 0, 6, 2, 2),  # no window
    ]
    for _ in range(count):
        kv = rng.choice([1, 2, 4])
        edge.append(
            BudgetContext(
                retention=rng.choice([rng.random(), 0.2, 0.4, 0.6, 0.8, 1.0]),
                prompt_len=rng.randint(1, 400),
                window=rng.choice([0, 4, 32]),
                num_layers=rng.randint(1, 12),
                num_kv_heads=kv,
                num_query_heads=kv * rng.choice([1, 2, 7]),
            )
        )
    return edge


def test_per_head_nominal_budget():
    assert BudgetContext(0.4, 1000).per_head == 400
    assert BudgetContext(0.1, 100, window=32).per_head == 32
    assert BudgetContext(0.5, 20, window=32).per_head == 20
    assert BudgetContext(0.25, 10, window=0).per_head == 3  # 2.5 rounds half up
    assert BudgetContext(1.0, 77).per_head == 77
    with pytest.raises(AudiokvError):
        BudgetContext(1.2, 10)
    with pytest.raises(AudiokvError):
        BudgetContext(0.5, 10, num_kv_heads=3, num_query_heads=4)


def test_largest_remainder_conserves_and_prefers_large_fractions():
    rounded = largest_remainder(torch.tensor([1.5, 2.25, 0.25, 3.0]), 7)
    assert rounded.tolist() == [2, 2, 0, 3]
    assert largest_remainder(torch.tensor([0.5, 0.5, 0.5, 0.5]), 2).tolist() == [1, 1, 0, 0]


def test_uniform_budget():
    ctx = BudgetContext(0.4, 300, 32, 4, 2, 8)
    for layer in range(4):
        assert UniformBudget().allocate(layer, None, ctx).tolist() == [120, 120]
    with pytest.raises(AudiokvError):
        UniformBudget().allocate(4, None, ctx)


def test_pyramid_conserves_bounds_and_decreases():
    allocator = PyramidBudget()
    for ctx in random_contexts(150):
        layer_budgets = allocator.layer_budgets(ctx)
        assert int(layer_budgets.sum()) == ctx.num_layers * ctx.per_head
        assert (layer_budgets >= ctx.effective_window).all() and (layer_budgets <= ctx.prompt_len).all()
        assert (layer_budgets[1:] <= layer_budgets[:-1]).all()
        slack = min(ctx.per_head - ctx.effective_window, ctx.prompt_len - ctx.per_head)
        if ctx.num_layers > 2 and slack >= 2 * ctx.num_layers:
            assert layer_budgets[0] > layer_budgets[-1]
        for layer in range(ctx.num_layers):
            row = allocator.allocate(layer, None, ctx)
            assert row.shape == (ctx.num_kv_heads,) and (row == layer_budgets[layer]).all()


def test_pyramid_schedule_values():
    # m = 40 - 32 = 8 evictable per head: the last layer keeps 8 // 20 = 0, the first 16, linearly in between.
    ctx = BudgetContext(0.4, 100, 32, num_layers=5)
    assert PyramidBudget().layer_budgets(ctx).tolist() == [48, 44, 40, 36, 32]
    # The first layer may not pass L: max capped to L - w = 68, min raised to 2 * 60 - 68 = 52 (m = 60).
    ctx = BudgetContext(0.92, 100, 32, num_layers=3)
    assert PyramidBudget().layer_budgets(ctx).tolist() == [100, 92, 84]


def test_edge_budgets_keep_everything_or_only_the_window():
    everything = BudgetContext(1.0, 77, 32, 5, 3, 6)
    only_window = BudgetContext(0.1, 100, 32, 4, 2, 4)
    short = BudgetContext(0.5, 20, 32, 3, 2, 2)
    profile = ProfileBudget(torch.rand(5, 6))
    for ctx, value in [(everything, 77), (only_window, 32), (short, 20)]:
        profile_for_ctx = ProfileBudget(torch.rand(ctx.num_layers, ctx.num_query_heads))
        allocators = [UniformBudget(), PyramidBudget(), AdaptiveBudget(), profile_for_ctx]
        for allocator in allocators:
            for layer in range(ctx.num_layers):
                scores = torch.rand(1, ctx.num_kv_heads, ctx.prompt_len)
                assert allocator.allocate(layer, scores, ctx).tolist() == [value] * ctx.num_kv_heads
    assert (profile.table(everything) == 77).all()


def naive_adaptive(scores, ctx, floor_fraction):
    """Per-head Python reference: floor set = window + best others; the pool goes to the best remaining entries."""
    heads, length = scores.shape
    window = ctx.effective_window
    floor = min(ctx.per_head, max(window, math.floor(floor_fraction * ctx.per_head)))
    candidates = []
    for h in range(heads):
        ranked = sorted(range(length), key=lambda p: (p < length - window, -float(scores[h, p]), p))
        candidates += [(-float(scores[h, p]), h * length + p, h) for p in ranked[floor:]]
    pool = heads * (ctx.per_head - floor)
    counts = [floor] * heads
    for _, _, h in sorted(candidates)[:pool]:
        counts[h] += 1
    return counts, floor


@pytest.mark.parametrize("floor_fraction", [0.0, 0.2, 0.9])
def test_adaptive_matches_naive_and_conserves(floor_fraction):
    allocator = AdaptiveBudget(floor=floor_fraction)
    torch.manual_seed(0)
    for ctx in random_contexts(60, seed=1):
        scores = torch.rand(1, ctx.num_kv_heads, ctx.prompt_len) ** 3
        budgets = allocator.allocate(0, scores, ctx)
        expected, floor = naive_adaptive(scores[0], ctx, floor_fraction)
        assert budgets.tolist() == expected
        assert int(budgets.sum()) == ctx.num_kv_heads * ctx.per_head
        assert (budgets >= floor).all() and (budgets >= ctx.effective_window).all()
        assert (budgets <= ctx.prompt_len).all()


def test_adaptive_gives_more_to_the_head_with_strong_scores_and_batches():
    ctx = BudgetContext(0.3, 200, 8, 1, 3, 3)
    scores = torch.full((2, 3, 200), 0.01)
    scores[0, 1] = 1.0  # batch 0: KV head 1 dominates every position
    scores[1, 2, :100] = 1.0  # batch 1: KV head 2 dominates half the prompt
    budgets = AdaptiveBudget(floor=0.2).allocate_batch(0, scores, ctx)
    floor = max(8, math.floor(0.2 * 60))
    assert budgets.tolist()[0] == [floor, 180 - 2 * floor, floor]
    # Head 2 wins its 100 strong positions not already in its floor (4 of them are); the rest of the pool ties
    # at 0.01 and goes to the lower flat index, i.e. head 0.
    assert budgets.tolist()[1] == [floor + (180 - 3 * floor - 96), floor, floor + 96]
    assert AdaptiveBudget().allocate(0, scores[:1], ctx).tolist() == budgets.tolist()[0]
    with pytest.raises(AudiokvError):
        AdaptiveBudget().allocate(0, None, ctx)
    with pytest.raises(AudiokvError):
        AdaptiveBudget().allocate(0, scores, ctx)


def naive_profile_table(head_scores, ctx, floor_fraction):
    """Exact rational water-filling of AudioKV eq. 1 with a per-head Python loop."""
    group = ctx.num_query_heads // ctx.num_kv_heads
    weights = []
    for layer in range(ctx.num_layers):
        for kv in range(ctx.num_kv_heads):
            weights.append(sum(Fraction(float(head_scores[layer, kv * group + g])) for g in range(group)))
    window = ctx.effective_window
    base = window + math.floor(floor_fraction * (ctx.per_head - window))
    pool = len(weights) * (ctx.per_head - base)
    room = ctx.prompt_len - base
    shares = [Fraction(0)] * len(weights)
    open_heads = set(range(len(weights)))
    remaining = Fraction(pool)
    while True:
        total = sum(weights[i] for i in open_heads)
        even = Fraction(1, len(open_heads))
        proposal = {i: remaining * (weights[i] / total if total > 0 else even) for i in open_heads}
        over = [i for i in open_heads if proposal[i] > room]
        if not over:
            shares = [proposal.get(i, shares[i]) for i in range(len(weights))]
            break
        for i in over:
            shares[i] = Fraction(room)
            remaining -= room
            open_heads.remove(i)
    floors = [math.floor(s) for s in shares]
    leftover = pool - sum(floors)
    for i in sorted(range(len(shares)), key=lambda i: (-(shares[i] - floors[i]), i))[:leftover]:
        floors[i] += 1
    return [[base + floors[l * ctx.num_kv_heads + h] for h in range(ctx.num_kv_heads)] for l in range(ctx.num_layers)]


@pytest.mark.parametrize("floor_fraction", [0.0, 0.5, 1.0])
def test_profile_table_matches_exact_reference_and_conserves(floor_fraction):
    torch.manual_seed(0)
    for ctx in random_contexts(80, seed=2):
        # Heavy-tailed profiles so some heads hit the L cap and hand their excess back.
        head_scores = torch.rand(ctx.num_layers, ctx.num_query_heads) ** 6
        table = ProfileBudget(head_scores, floor_fraction=floor_fraction).table(ctx)
        assert table.shape == (ctx.num_layers, ctx.num_kv_heads) and table.dtype == torch.long
        assert int(table.sum()) == ctx.num_layers * ctx.num_kv_heads * ctx.per_head
        assert (table >= ctx.effective_window).all() and (table <= ctx.prompt_len).all()
        assert table.tolist() == naive_profile_table(head_scores, ctx, floor_fraction)


def test_profile_higher_score_never_gets_less():
    ctx = BudgetContext(0.4, 500, 32, 6, 4, 8)
    head_scores = torch.rand(6, 8) ** 4
    table = ProfileBudget(head_scores).table(ctx).flatten()
    kv_scores = head_scores.view(6, 4, 2).sum(-1).flatten()
    for a in range(24):
        for b in range(24):
            if kv_scores[a] > kv_scores[b]:
                assert table[a] >= table[b]
    assert table.max() > table.min()


@pytest.mark.parametrize("query_head", [0, 3, 5, 7])
def test_profile_gqa_group_sum(query_head):
    ctx = BudgetContext(0.4, 300, 32, 3, 2, 8)  # G = 4: query heads 4..7 -> KV head 1
    head_scores = torch.zeros(3, 8)
    head_scores[1, query_head] = 1.0
    table = ProfileBudget(head_scores).table(ctx)
    raised = (1, query_head // 4)
    others = [table[l, h] for l in range(3) for h in range(2) if (l, h) != raised]
    assert all(table[raised] > other for other in others)
    assert max(others) - min(others) <= 1  # the excess above L is shared evenly among the rest
    assert int(table[raised]) == 300  # the whole pool would exceed L, so it is capped


def test_profile_zero_scores_degrade_to_uniform():
    ctx = BudgetContext(0.37, 333, 32, 4, 2, 4)
    table = ProfileBudget(torch.zeros(4, 4)).table(ctx)
    assert (table == ctx.per_head).all()


def test_profile_table_is_cached_and_rows_are_allocations(tmp_path):
    ctx = BudgetContext(0.4, 200, 32, 3, 2, 4)
    head_scores = torch.rand(3, 4)
    profile = ProfileBudget(head_scores)
    assert profile.table(ctx) is profile.table(ctx)
    for layer in range(3):
        assert torch.equal(profile.allocate(layer, torch.rand(1, 2, 200), ctx), profile.table(ctx)[layer])
    path = tmp_path / "profile.safetensors"
    save_file({"score": head_scores.contiguous()}, str(path))
    assert torch.equal(ProfileBudget.from_file(path).table(ctx), profile.table(ctx))
    assert torch.equal(make_budget("profile", head_scores=str(path)).table(ctx), profile.table(ctx))
    assert torch.equal(ProfileBudget.from_file("ignored", loader=lambda _: head_scores).table(ctx), profile.table(ctx))


def test_profile_errors(tmp_path):
    ctx = BudgetContext(0.4, 200, 32, 3, 2, 4)
    with pytest.raises(AudiokvError, match="shape"):
        ProfileBudget(torch.rand(2, 4)).table(ctx)
    with pytest.raises(AudiokvError, match="non-negative"):
        ProfileBudget(-torch.rand(3, 4)).table(ctx)
    path = tmp_path / "other.safetensors"
    save_file({"weights": torch.rand(3, 4)}, str(path))
    with pytest.raises(AudiokvError, match="'score'"):
        ProfileBudget.from_file(path)
    with pytest.raises(AudiokvError, match="cannot read"):
        ProfileBudget.from_file(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a profile")
    with pytest.raises(AudiokvError, match="cannot read"):
        ProfileBudget.from_file(tmp_path / "junk.safetensors")


def test_make_budget_names():
    assert make_budget("uniform").name == "uniform"
    assert make_budget("pyramid", beta=10).beta == 10
    assert make_budget("adaptive", floor=0.3).floor == 0.3
    assert make_budget("profile", head_scores=torch.ones(2, 2)).name == "profile"
    with pytest.raises(AudiokvError, match="head profile"):
        make_budget("profile")
    with pytest.raises(AudiokvError, match="unknown budget"):
        make_budget("snapkv")
