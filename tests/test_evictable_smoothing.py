"""Smoothing filters only evictable positions; budgets count forced positions; SnapKV equals kvpress's algorithm."""

import pytest
import torch
import torch.nn.functional as F

from audiokv_cli.compression.budgets import BudgetContext
from audiokv_cli.compression.methods import METHODS, MethodOptions, build_policy
from audiokv_cli.compression.policy import CompressionPolicy
from audiokv_cli.compression.scorers import WindowAttentionScorer
from audiokv_cli.compression.smoothers import PoolSmoothing, SpectralSmoothing


def _qk(batch=1, query_heads=4, kv_heads=2, length=200, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(batch, query_heads, length, dim, generator=generator)
    keys = torch.randn(batch, kv_heads, length, dim, generator=generator)
    return queries, keys


def kvpress_snapkv_keep(queries, keys, scaling, window, kernel, compression_ratio):
    """kvpress's SnapKV as documented: window attention over the earlier keys only, pooled per query head, averaged
    per GQA group, the window padded with the maximum score, then the top int(L * (1 - ratio)) positions."""
    batch, query_heads, length, _ = queries.shape
    group = query_heads // keys.shape[1]
    repeated = keys.repeat_interleave(group, dim=1)
    logits = queries[:, :, -window:] @ repeated.transpose(-1, -2) * scaling
    query_pos = torch.arange(length - window, length)[:, None]
    logits = logits.masked_fill(torch.arange(length)[None, :] > query_pos, float("-inf"))
    weights = torch.softmax(logits, dim=-1)[..., :-window]
    scores = weights.mean(dim=-2)
    scores = F.avg_pool1d(scores, kernel_size=kernel, padding=kernel // 2, stride=1)
    scores = scores.view(batch, keys.shape[1], group, length - window).mean(dim=2)
    scores = F.pad(scores, (0, window), value=scores.max().item())
    kept = int(length * (1 - compression_ratio))
    indices = scores.topk(kept, dim=-1).indices
    return torch.zeros(batch, keys.shape[1], length, dtype=torch.bool).scatter_(-1, indices, True)


def _context(length, retention, window=32, scope="all", spans=(), layers=1, kv_heads=2, query_heads=4):
    return BudgetContext(
        retention=retention,
        prompt_len=length,
        window=window,
        num_layers=layers,
        num_kv_heads=kv_heads,
        num_query_heads=query_heads,
        scope=scope,
        audio_spans=tuple(spans),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_snapkv_keeps_what_kvpress_snapkv_keeps(seed):
    queries, keys = _qk(length=200, seed=seed)
    scaling = queries.shape[-1] ** -0.5
    policy = build_policy("snapkv", retention=0.4, options=MethodOptions(window=32, kernel=5))
    keep = policy.keep_mask(0, queries, keys, scaling, _context(200, 0.4))
    expected = kvpress_snapkv_keep(queries, keys, scaling, window=32, kernel=5, compression_ratio=0.6)
    assert torch.equal(keep, expected)


@pytest.mark.parametrize("smoother", [SpectralSmoothing(), PoolSmoothing(kernel=5)])
def test_a_spike_in_the_window_does_not_change_the_kept_set(smoother):
    queries, keys = _qk(length=160, seed=3)
    ctx = _context(160, 0.3)
    policy = CompressionPolicy("p", WindowAttentionScorer(32), smoother, retention=0.3)
    scores = policy.scorer.score(queries, keys, queries.shape[-1] ** -0.5)
    spiked = scores.clone()
    spiked[..., -32:] = 0.0
    spiked[..., -20] = 1e3  # a huge planted spike inside the always-kept window
    base = policy.keep_mask(0, queries, keys, 1.0, ctx, scores=scores)
    assert torch.equal(policy.keep_mask(0, queries, keys, 1.0, ctx, scores=spiked), base)


def test_smoothing_under_scope_audio_reads_only_the_audio_span():
    queries, keys = _qk(length=120, seed=4)
    spans = [(10, 90)]
    ctx = _context(120, 0.5, scope="audio", spans=spans)
    policy = CompressionPolicy("p", WindowAttentionScorer(32), SpectralSmoothing(), retention=0.5, scope="audio")
    scores = policy.scorer.score(queries, keys, 1.0)
    noisy_text = scores.clone()
    noisy_text[..., :10] = torch.rand(noisy_text[..., :10].shape) * 100  # text before the audio
    smoothed = policy.smooth_evictable(scores, policy.smoothed_positions(ctx))
    smoothed_noisy = policy.smooth_evictable(noisy_text, policy.smoothed_positions(ctx))
    torch.testing.assert_close(smoothed[..., 10:90], smoothed_noisy[..., 10:90], rtol=0, atol=0)
    # The evictable audio (the span up to the window at 88) is smoothed as one sequence, as if filtered alone.
    torch.testing.assert_close(smoothed[..., 10:88], SpectralSmoothing().smooth(scores[..., 10:88].contiguous()))


def test_smooth_over_audio_leaves_text_scores_raw_under_scope_all():
    queries, keys = _qk(length=100, seed=5)
    ctx = _context(100, 0.5, spans=[(5, 60)])
    policy = CompressionPolicy("p", WindowAttentionScorer(32), SpectralSmoothing(), retention=0.5, smooth_over="audio")
    positions = policy.smoothed_positions(ctx)
    assert positions[5:60].all() and not positions[:5].any() and not positions[60:].any()
    scores = policy.scorer.score(queries, keys, 1.0)
    smoothed = policy.smooth_evictable(scores, positions)
    assert torch.equal(smoothed[..., :5], scores[..., :5]) and torch.equal(smoothed[..., 60:], scores[..., 60:])
    with pytest.raises(ValueError):
        CompressionPolicy("p", WindowAttentionScorer(32), smooth_over="text")


@pytest.mark.parametrize("scope", ["all", "audio"])
@pytest.mark.parametrize("retention", [0.2, 0.4, 0.6])
@pytest.mark.parametrize("method", [m for m in METHODS if m != "full"])
def test_kept_entries_stay_within_the_retention_target(method, retention, scope):
    layers, kv_heads, query_heads, length = 3, 2, 4, 150
    spans = [(20, 110)]  # 60 text tokens: under scope audio at 0.2 they alone pass the target
    generator = torch.Generator().manual_seed(7)
    profile = torch.rand(layers, query_heads, generator=generator)
    policy = build_policy(method, retention, MethodOptions(scope=scope, head_scores=profile))
    ctx = _context(length, retention, scope=scope, spans=spans, layers=layers, kv_heads=kv_heads)
    kept = 0
    for layer in range(layers):
        queries, keys = _qk(query_heads=query_heads, kv_heads=kv_heads, length=length, seed=layer)
        keep = policy.keep_mask(layer, queries, keys, queries.shape[-1] ** -0.5, ctx)
        assert keep[..., ctx.forced].all(), "forced positions are always kept"
        kept += int(keep.sum())
    target = layers * kv_heads * max(round(retention * length), ctx.num_forced)
    assert kept <= target
    if ctx.num_forced <= round(retention * length):
        assert kept == target, "the whole budget is spent when the forced positions fit in it"


def test_coverage_keeps_evenly_spaced_positions_whatever_the_scores():
    length, window = 400, 32
    ctx = _context(length, 0.25, window=window, spans=[(10, 300)])
    policy = CompressionPolicy("p", WindowAttentionScorer(window), retention=0.25, coverage=1.0, smooth_over="audio")
    queries, keys = _qk(length=length, seed=6)
    scores = torch.zeros(1, 2, length)
    scores[..., 300:368] = 1.0  # every score points outside the audio
    keep = policy.keep_mask(0, queries, keys, 1.0, ctx, scores=scores)[0]
    evictable_budget = ctx.per_head - ctx.num_forced
    for head in range(2):
        audio_kept = torch.nonzero(keep[head, 10:300]).flatten() + 10
        assert audio_kept.numel() == evictable_budget  # the whole evictable budget went to the audio
        assert int(torch.diff(audio_kept).max()) <= 2 * 290 // evictable_budget + 1  # evenly spread
        assert not keep[head, 300:368].any()


def test_partial_coverage_leaves_the_rest_to_the_scores():
    length = 300
    ctx = _context(length, 0.4, window=0, spans=[(0, length)])
    policy = CompressionPolicy("p", WindowAttentionScorer(8), retention=0.4, coverage=0.5)
    budgets = torch.tensor([120, 120])
    covered = policy.coverage_positions(ctx, budgets)
    assert covered.sum(-1).tolist() == [60, 60]
    scores = torch.rand(1, 2, length, generator=torch.Generator().manual_seed(0))
    keep = policy.keep_mask(0, *_qk(length=length, seed=1), 1.0, ctx, scores=scores)[0]
    assert keep[covered].all() and keep.sum(-1).tolist() == [120, 120]
    best_rest = scores[0].masked_fill(covered, -1).topk(60, dim=-1).indices
    assert keep.gather(-1, best_rest).all()
