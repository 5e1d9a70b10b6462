import math

import pytest
import torch

from audiokv_cli.compression import scorers as scorers_module
from audiokv_cli.compression.scorers import (
    AccumulatedAttentionScorer,
    RandomScorer,
    StreamingScorer,
    StrideScorer,
    WindowAttentionScorer,
    make_scorer,
)
from audiokv_cli.errors import AudiokvError


def naive_full_attention(queries, keys, scaling):
    """Full causal attention [B, Hq, L, L] with keys repeated per query head (h -> h // G), like repeat_kv."""
    batch, num_query_heads, length, _ = queries.shape
    group = num_query_heads // keys.shape[1]
    probs = torch.zeros(batch, num_query_heads, length, length, dtype=torch.float64)
    for b in range(batch):
        for h in range(num_query_heads):
            key = keys[b, h // group].double()
            for i in range(length):
                logits = (queries[b, h, i].double() @ key[: i + 1].T) * scaling
                probs[b, h, i, : i + 1] = torch.softmax(logits, dim=-1)
    return probs


def group_mean(per_query_head, num_kv_heads):
    group = per_query_head.shape[1] // num_kv_heads
    return torch.stack(
        [per_query_head[:, g * group : (g + 1) * group].mean(dim=1) for g in range(num_kv_heads)], dim=1
    )


def random_qk(batch=2, num_query_heads=6, num_kv_heads=2, length=19, head_dim=8, seed=0):
    torch.manual_seed(seed)
    return torch.randn(batch, num_query_heads, length, head_dim), torch.randn(batch, num_kv_heads, length, head_dim)


@pytest.mark.parametrize("length,window", [(19, 5), (19, 19), (7, 32), (1, 4)])
def test_window_scorer_matches_full_attention(length, window):
    queries, keys = random_qk(length=length)
    scaling = 8 ** -0.5
    full = naive_full_attention(queries, keys, scaling)
    w = min(window, length)
    expected = group_mean(full[:, :, length - w :].mean(dim=2), keys.shape[1])
    got = WindowAttentionScorer(window=window).score(queries, keys, scaling)
    assert got.dtype == torch.float32 and got.shape == (2, 2, length)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)


def test_window_scorer_gqa_mapping_is_contiguous():
    # 8 query heads over 2 KV heads: query heads 4..7 belong to KV head 1 (h // G), not 1, 3, 5, 7 (h % Hkv).
    batch, num_query_heads, num_kv_heads, length, head_dim, planted = 1, 8, 2, 40, 16, 11
    torch.manual_seed(1)
    queries = 0.1 * torch.randn(batch, num_query_heads, length, head_dim)
    keys = 0.1 * torch.randn(batch, num_kv_heads, length, head_dim)
    direction = torch.zeros(head_dim)
    direction[0] = 1.0
    keys[:, :, planted] += 8.0 * direction  # the same strong key in every KV head
    queries[:, 4:8, :] += 2.0 * direction  # ... but only KV head 1's query group looks for it
    scores = WindowAttentionScorer(window=8).score(queries, keys, head_dim ** -0.5)[0]
    assert int(scores[1].argmax()) == planted
    assert scores[1, planted] > 0.5
    assert scores[0, planted] < 0.1


@pytest.mark.parametrize("chunk", [1, 4, 7, 19, 1000])
@pytest.mark.parametrize("normalize", [False, True])
def test_h2o_chunked_matches_full_column_sums(chunk, normalize):
    queries, keys = random_qk(length=19)
    scaling = 0.3
    full = naive_full_attention(queries, keys, scaling)
    expected = group_mean(full.sum(dim=2), keys.shape[1])
    if normalize:
        expected = expected / torch.arange(19, 0, -1, dtype=torch.float64)
    got = AccumulatedAttentionScorer(chunk=chunk, normalize=normalize).score(queries, keys, scaling)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_attention_scorers_never_build_a_full_square(monkeypatch):
    seen = []
    real_softmax = torch.softmax

    def recording_softmax(x, dim):
        seen.append(x.shape[-2] * x.shape[-1])
        return real_softmax(x, dim=dim)

    monkeypatch.setattr(scorers_module.torch, "softmax", recording_softmax)
    length = 64
    queries, keys = random_qk(length=length)
    WindowAttentionScorer(window=8).score(queries, keys, 0.3)
    assert seen and max(seen) <= 8 * length
    seen.clear()
    AccumulatedAttentionScorer(chunk=16).score(queries, keys, 0.3)
    assert len(seen) == 4 and max(seen) <= 16 * length


def test_random_scorer_is_seeded_and_ignores_global_rng():
    queries, keys = random_qk()
    torch.manual_seed(123)
    first = RandomScorer(seed=5).score(queries, keys, 1.0)
    torch.manual_seed(999)
    torch.rand(10)
    second = RandomScorer(seed=5).score(queries, keys, 1.0)
    other = RandomScorer(seed=6).score(queries, keys, 1.0)
    assert first.shape == (2, 2, 19) and first.dtype == torch.float32
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert ((first >= 0) & (first < 1)).all()


@pytest.mark.parametrize("length", [1, 2, 3, 10, 31, 32, 33, 100, 257])
def test_stride_scorer_spreads_every_prefix(length):
    queries, keys = random_qk(batch=1, length=length)
    scores = StrideScorer().score(queries, keys, 1.0)
    assert scores.shape == (1, 2, length)
    assert torch.equal(scores[0, 0], scores[0, 1])
    order = torch.sort(scores[0, 0], descending=True, stable=True).indices
    assert len(set(scores[0, 0].tolist())) == length  # a strict ranking, so top-b is well defined
    for budget in range(1, length + 1):
        picks = sorted(order[:budget].tolist())
        bounds = [0] + picks + [length]
        gaps = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        assert picks[0] == 0
        assert max(gaps[1:]) <= math.ceil(2 * length / budget), (budget, picks)


def test_streaming_scorer_keeps_sinks_then_recent():
    queries, keys = random_qk(batch=1, length=30)
    scores = StreamingScorer(sinks=4).score(queries, keys, 1.0)[0, 1]
    for budget in [1, 3, 4, 5, 12, 30]:
        top = set(torch.topk(scores, budget).indices.tolist())
        sinks = min(4, budget)
        assert top == set(range(sinks)) | set(range(30 - (budget - sinks), 30))


def test_make_scorer_names_and_errors():
    assert isinstance(make_scorer("window", window=16), WindowAttentionScorer)
    assert make_scorer("h2o").name == "h2o"
    assert make_scorer("streaming", sinks=2).sinks == 2
    for name in ["random", "stride"]:
        assert make_scorer(name).name == name
    with pytest.raises(AudiokvError, match="unknown scorer"):
        make_scorer("snap")
    with pytest.raises(AudiokvError, match="does not take"):
        make_scorer("window", kernel=3)
    with pytest.raises(AudiokvError):
        make_scorer("window", window=0)


def test_mismatched_shapes_are_rejected():
    with pytest.raises(AudiokvError):
        WindowAttentionScorer().score(torch.randn(1, 3, 5, 4), torch.randn(1, 2, 5, 4), 1.0)
    with pytest.raises(AudiokvError):
        WindowAttentionScorer().score(torch.randn(1, 4, 5, 4), torch.randn(1, 2, 6, 3), 1.0)


def test_cross_attention_scores_see_every_frame():
    """Decoder queries over encoder frames (Whisper): no causal mask, all queries of the window, GQA averaged."""
    queries, keys = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 50, 8)
    probs = torch.softmax(queries @ keys.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.5, dim=-1)  # [1,4,3,50]
    expected = probs.mean(dim=2).view(1, 2, 2, 50).mean(dim=2)
    torch.testing.assert_close(WindowAttentionScorer(window=32).score(queries, keys, 0.5), expected)
    torch.testing.assert_close(
        AccumulatedAttentionScorer().score(queries, keys, 0.5), probs.sum(dim=2).view(1, 2, 2, 50).mean(dim=2)
    )
    last_two = probs[:, :, 1:].mean(dim=2).view(1, 2, 2, 50).mean(dim=2)
    torch.testing.assert_close(WindowAttentionScorer(window=2).score(queries, keys, 0.5), last_two)
