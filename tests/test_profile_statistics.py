"""The head statistic on planted attention, the time-to-token map, token-to-word alignment, exact accumulation."""

import math
import random

import pytest
import torch

from audiokv_cli.errors import AudiokvError
from audiokv_cli.profiling.alignment import WordTiming, group_words
from audiokv_cli.profiling.capture import AttentionRecorder, last_row_attention
from audiokv_cli.profiling.statistics import (
    MASS_QUANTUM,
    HeadStatistics,
    align_tokens_to_words,
    hit_counts,
    hit_ratios,
    quantize_mass,
    word_token_span,
)


def planted_qk(logits: torch.Tensor, num_kv_heads: int):
    """Query/key whose attention logits (scaling 1) are exactly ``logits`` [Hq, kv_len] for every query head.

    Keys are one-hot over a kv_len-dim space, so q . k_j = q[j]; KV head g's keys are shared by its query group.
    """
    hq, kv_len = logits.shape
    key = torch.eye(kv_len).expand(num_kv_heads, kv_len, kv_len).unsqueeze(0).contiguous()  # [1, Hkv, kv, D=kv]
    query = logits.reshape(1, hq, 1, kv_len)
    return query, key


def test_hit_ratio_on_planted_attention_matches_hand_count():
    # 2 query heads sharing 1 KV head, 10 keys; audio word span = positions [3, 6).
    logits = torch.full((2, 10), -5.0)
    logits[0, [3, 4, 8]] = torch.tensor([9.0, 8.0, 7.0])  # head 0 top-3: 3, 4 (in span), 8 (out)
    logits[1, [0, 1, 5]] = torch.tensor([9.0, 8.0, 7.0])  # head 1 top-3: 0, 1 (out), 5 (in)
    query, key = planted_qk(logits, num_kv_heads=1)
    probabilities = last_row_attention(query, key, None, scaling=1.0)
    topk = probabilities.topk(3, dim=-1).indices
    assert hit_counts(topk, (3, 6)).tolist() == [2, 1]
    assert hit_ratios(topk, (3, 6), 3).tolist() == [2 / 3, 1 / 3]
    # Padding (-1) from a context shorter than K never counts.
    assert hit_counts(torch.tensor([[3, -1, -1]]), (0, 6)).tolist() == [1]


def test_last_row_attention_matches_naive_softmax_with_gqa_and_masks():
    torch.manual_seed(0)
    hq, hkv, q_len, kv_len, dim = 4, 2, 3, 7, 5
    query = torch.randn(1, hq, q_len, dim)
    key = torch.randn(1, hkv, kv_len, dim)
    scaling = dim**-0.5
    # Naive reference: query head h reads KV head h // group (contiguous groups, like repeat_kv).
    expected = torch.stack(
        [torch.softmax(query[0, h, -1] @ key[0, h // (hq // hkv)].T * scaling, dim=-1) for h in range(hq)]
    )
    assert torch.allclose(last_row_attention(query, key, None, scaling), expected, atol=1e-6)
    additive = torch.zeros(1, 1, q_len, kv_len)
    additive[..., 2] = float("-inf")
    masked = last_row_attention(query, key, additive, scaling)
    allowed = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool)
    allowed[..., 2] = False
    assert torch.allclose(masked, last_row_attention(query, key, allowed, scaling), atol=1e-7)
    assert masked[:, 2].abs().max() == 0
    assert torch.allclose(masked.sum(-1), torch.ones(hq), atol=1e-6)


def test_recorder_keeps_topk_and_audio_mass_and_pads_short_contexts():
    class Layer:
        layer_idx = 0

    logits = torch.tensor([[1.0, 5.0, 2.0], [4.0, 0.0, 3.0]])
    query, key = planted_qk(logits, num_kv_heads=2)
    value = torch.randn(1, 2, 3, 3)
    recorder = AttentionRecorder(num_layers=1, top_k=4, audio_spans=[(1, 3)])
    output, _ = recorder(Layer(), query, key, value, None, 1.0)
    topk, mass = recorder.take()
    assert topk.shape == (1, 2, 4)
    assert topk[0, 0].tolist() == [1, 2, 0, -1] and topk[0, 1].tolist() == [0, 2, 1, -1]
    expected_mass = torch.softmax(logits, -1)[:, 1:3].sum(-1)
    assert torch.allclose(mass[0], expected_mass, atol=1e-6)
    with pytest.raises(AudiokvError, match="layers"):
        recorder.take()  # nothing recorded since the last take


@pytest.mark.parametrize(
    "start,end,expected",
    [
        (0.0, 0.04, (10, 11)),  # exactly one token
        (0.10, 0.30, (12, 18)),  # floor(2.5)=2 .. ceil(7.5)=8
        (0.28, 0.32, (17, 18)),  # float noise at 0.28/0.04 must not add a token
        (0.0, 99.0, (10, 60)),  # clipped to the audio span
        (5.0, 5.0, (59, 60)),  # past the end: last token, never empty
    ],
)
def test_word_token_span_with_exact_frame_rate(start, end, expected):
    assert word_token_span(start, end, (10, 60), 0.04, audio_seconds=2.0) == expected


def test_word_token_span_uniform_map_without_frame_rate():
    # 100 audio tokens over 4 s: the paper's a = a0 + floor(t / T * N).
    assert word_token_span(1.0, 2.0, (5, 105), None, audio_seconds=4.0) == (30, 55)
    with pytest.raises(AudiokvError):
        word_token_span(0.0, 1.0, (5, 5), 0.04, audio_seconds=1.0)


def test_tokens_align_to_reference_words_by_character_offsets():
    reference = [
        WordTiming("Hello", 0.0, 0.4, 0.99),
        WordTiming("big", 0.5, 0.7, 0.50),  # below the confidence threshold
        WordTiming("world", 0.8, 1.2, 0.97),
    ]
    pieces = ["Hel", "lo", ",", " big", " wor", "ld", " extra", "!"]
    aligned = align_tokens_to_words(pieces, reference, min_confidence=0.95)
    names = [w.word if w else None for w in aligned]
    assert names == ["Hello", "Hello", None, None, "world", "world", None, None]


def test_alignment_skips_a_missing_word_and_keeps_the_rest():
    reference = [WordTiming(w, i, i + 0.5, 1.0) for i, w in enumerate(["one", "two", "three"])]
    aligned = align_tokens_to_words([" one", " three"], reference, 0.95)
    assert [w.word for w in aligned] == ["one", "three"]


def test_group_words_from_token_pieces():
    pieces = [" he", "llo", " ", "world", ","]
    positions = [2, 3, 4, 5, 6]
    times = [0.0, 0.0, 0.1, 0.3, 0.6, 0.7, 0.9, 1.0]
    probabilities = {2: 0.9, 3: 0.7, 5: 0.5, 6: 1.0}
    probabilities[4] = 0.1
    words = group_words(pieces, positions, times, probabilities)
    # Token i ends at times[i]: "hello" runs from the end of the token before it (0.0) to 0.3.
    assert [(w.word, w.start, w.end) for w in words] == [("hello", 0.0, 0.3), ("world,", 0.6, 0.9)]
    assert math.isclose(words[0].confidence, 0.8) and math.isclose(words[1].confidence, 0.75)


def test_accumulation_is_exact_in_any_order():
    torch.manual_seed(1)
    steps = [(torch.randint(0, 40, (3, 4, 6)), torch.rand(3, 4), (5, 15)) for _ in range(50)]
    forward = HeadStatistics.zeros(3, 4, 6)
    for step in steps:
        forward.add_step(*step)
    shuffled = steps[:]
    random.Random(0).shuffle(shuffled)
    halves = [HeadStatistics.zeros(3, 4, 6), HeadStatistics.zeros(3, 4, 6)]
    for index, step in enumerate(shuffled):
        halves[index % 2].add_step(*step)
    halves[1].add(halves[0])
    for name in ("hit_counts", "steps", "audio_mass"):
        assert torch.equal(getattr(forward, name), getattr(halves[1], name)), name
    assert torch.equal(forward.score("topk_hits"), halves[1].score("topk_hits"))
    # The hand-computable parts: steps and the mean hit ratio.
    assert forward.steps.eq(50).all()
    expected = sum(hit_counts(t, s).double() / 6 for t, _, s in steps) / 50
    assert torch.allclose(forward.score("topk_hits"), expected, atol=1e-12)
    assert torch.allclose(forward.audio_mass, sum(m.double() for _, m, _ in steps), atol=50 * MASS_QUANTUM)


def test_quantized_mass_round_trips_through_hits_and_mass_tensors():
    stats = HeadStatistics.zeros(2, 2, 24)
    stats.add_step(torch.randint(0, 30, (2, 2, 24)), torch.rand(2, 2), (0, 10))
    rebuilt = HeadStatistics.from_tensors(stats.hits, stats.steps, stats.audio_mass, 24)
    assert torch.equal(rebuilt.hit_counts, stats.hit_counts)
    assert torch.equal(quantize_mass(stats.audio_mass), stats.audio_mass)
    unscored = HeadStatistics.zeros(1, 2, 4).score("audio_mass")
    assert unscored.tolist() == [[0.0, 0.0]]
