import random

import pytest
import torch

from audiokv_cli.compression.selection import forced_mask, select_positions
from audiokv_cli.errors import AudiokvError


def naive_select(scores, budgets, forced):
    heads, length = scores.shape
    keep = torch.zeros(heads, length, dtype=torch.bool)
    forced_positions = [p for p in range(length) if forced[p]]
    for h in range(heads):
        others = sorted((p for p in range(length) if not forced[p]), key=lambda p: (-float(scores[h, p]), p))
        extra = max(0, min(int(budgets[h]), length) - len(forced_positions))
        for p in forced_positions + others[:extra]:
            keep[h, p] = True
    return keep


def test_select_matches_naive_loop():
    rng = random.Random(0)
    torch.manual_seed(0)
    for _ in range(200):
        length = rng.randint(1, 60)
        heads = rng.randint(1, 5)
        window = rng.choice([0, 1, 4, 32])
        spans = None
        scope = rng.choice(["all", "audio"])
        if scope == "audio":
            start = rng.randint(0, length)
            spans = [(start, rng.randint(start, length))]
        forced = forced_mask(length, window, spans, scope)
        # Coarse scores so ties are common.
        scores = torch.randint(0, 5, (heads, length)).float()
        budgets = torch.randint(0, length + 3, (heads,))
        keep = select_positions(scores, budgets, forced)
        assert torch.equal(keep, naive_select(scores, budgets, forced))
        expected_counts = torch.clamp(torch.maximum(budgets, forced.sum()), max=length)
        assert torch.equal(keep.sum(dim=-1), expected_counts)
        assert keep[:, forced].all()


def test_ties_go_to_lower_positions():
    scores = torch.ones(2, 10)
    forced = forced_mask(10, 2)
    keep = select_positions(scores, torch.tensor([5, 2]), forced)
    assert keep[0].nonzero().flatten().tolist() == [0, 1, 2, 8, 9]
    assert keep[1].nonzero().flatten().tolist() == [8, 9]


def test_nan_and_infinite_scores_never_displace_forced_positions():
    scores = torch.tensor([[float("inf"), float("nan"), 0.5, -float("inf"), 0.1, 0.0]])
    forced = torch.tensor([False, False, False, False, True, True])
    keep = select_positions(scores, torch.tensor([4]), forced)
    assert keep[0].nonzero().flatten().tolist() == [0, 2, 4, 5]
    keep = select_positions(scores, torch.tensor([6]), forced)
    assert keep.all()


def test_batched_scores_and_per_batch_forced_mask():
    torch.manual_seed(1)
    scores = torch.rand(3, 2, 20)
    budgets = torch.tensor([[4, 8], [20, 0], [10, 10]])
    forced = forced_mask(20, 3)
    keep = select_positions(scores, budgets, forced)
    for b in range(3):
        assert torch.equal(keep[b], naive_select(scores[b], budgets[b], forced))
    with pytest.raises(AudiokvError):
        select_positions(scores, budgets[0], forced)
    with pytest.raises(AudiokvError):
        select_positions(scores, budgets, forced_mask(19, 3))


def test_forced_mask():
    assert forced_mask(6, 2).tolist() == [False] * 4 + [True] * 2
    assert forced_mask(3, 32).tolist() == [True] * 3
    assert forced_mask(4, 0).tolist() == [False] * 4
    # Text before and after the audio is always kept under scope "audio".
    assert forced_mask(10, 2, [(2, 5), (6, 8)], "audio").tolist() == [
        True, True, False, False, False, True, False, False, True, True,
    ]
    assert forced_mask(10, 2, [(2, 5)], "all").sum() == 2
    assert forced_mask(5, 1, None, "audio").all()
    with pytest.raises(AudiokvError, match="scope"):
        forced_mask(10, 2, None, "text")
    with pytest.raises(AudiokvError, match="outside"):
        forced_mask(10, 2, [(4, 11)], "audio")
