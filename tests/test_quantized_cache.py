"""Quantized kept entries: packing, the affine codes, every CPU decode kernel against a naive dequantize-then-attend
reference, the per-entry logit bias, exact byte accounting and the byte budget."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from audiokv_cli.compression import byte_budget
from audiokv_cli.compression.cache import RaggedLayer, layer_problem
from audiokv_cli.compression.decode_kernels import KERNELS
from audiokv_cli.compression.methods import MethodOptions, build_policy
from audiokv_cli.compression.quantization import HalfEntries, QuantConfig, QuantizedEntries, pack, unpack
from audiokv_cli.errors import AudiokvError

CPU_KERNELS = ("matmul", "sdpa", "padded")


@given(bits=st.sampled_from([8, 4, 2]), rows=st.integers(1, 5), groups=st.integers(1, 4), seed=st.integers(0, 99))
@settings(max_examples=40, deadline=None)
def test_pack_round_trip(bits, rows, groups, seed):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, groups * 8), generator=generator, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape[-1] == groups * 8 * bits // 8  # really packed: bits/8 bytes per code
    assert torch.equal(unpack(packed, bits), codes)


def naive_unpack(byte_row: list[int], bits: int) -> list[int]:
    """Codes of one packed row, lowest bits first, by plain integer arithmetic."""
    out = []
    for byte in byte_row:
        for index in range(8 // bits):
            out.append((byte >> (bits * index)) & ((1 << bits) - 1))
    return out


def naive_dequantize(entries, lengths: list[int]) -> torch.Tensor:
    """[N, D] from the stored codes, scales and minimums, one entry and channel at a time."""
    if isinstance(entries, HalfEntries):
        return entries.data.float()
    rows = []
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    group_start = 0
    for segment, n in enumerate(lengths):
        for position in range(n):
            index = offsets[segment] + position
            codes = naive_unpack(entries.codes[index].tolist(), entries.bits) if entries.bits < 8 else (
                entries.codes[index].tolist()
            )
            row = []
            for channel, code in enumerate(codes):
                if entries.per_channel:
                    group = group_start + position // entries.group
                    scale, low = entries.scale[group, channel], entries.minimum[group, channel]
                else:
                    group = channel // entries.group
                    scale, low = entries.scale[index, group], entries.minimum[index, group]
                row.append(float(low) + code * float(scale))
            rows.append(row)
        if entries.per_channel:
            group_start += math.ceil(n / entries.group)
    return torch.tensor(rows)


def naive_attention(query, keys, values, lengths, bias=None, scaling=1.0):
    """Per segment: softmax over that segment's (dequantized) entries; query [S, W, D] -> [S, W, D]."""
    out = []
    offset = 0
    for segment, n in enumerate(lengths):
        k, v = keys[offset : offset + n].double(), values[offset : offset + n].double()
        scores = query[segment].double() @ k.T * scaling
        if bias is not None:
            scores = scores + bias[offset : offset + n].double()
        out.append(torch.softmax(scores, -1) @ v)
        offset += n
    return torch.stack(out)


def compressed_layer(bits, batch=2, heads=3, length=90, dim=16, seed=0, window=None, keep_share=0.6):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, length, dim, generator=generator)
    keys[..., 3] *= 8  # an outlier channel, as real keys have
    values = torch.randn(batch, heads, length, dim, generator=generator)
    keep = torch.rand(batch, heads, length, generator=generator) < keep_share
    keep[0, 1] = False  # a head that kept nothing
    keep[-1, -1] = True  # and one that kept everything
    layer = RaggedLayer()
    layer.update(keys, values)
    layer.compress(keep, window, QuantConfig(bits, key_group=16, value_group=8))
    return layer, keys, values, keep


@pytest.mark.parametrize("bits", [16, 8, 4, 2])
@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_kernels_match_naive_dequantize_then_attend(bits, kernel):
    layer, keys, values, keep = compressed_layer(bits)
    assert layer.kv_bits == bits
    lengths = list(layer.layout.lengths)
    ref_keys = naive_dequantize(layer.flat_keys, lengths)
    ref_values = naive_dequantize(layer.flat_values, lengths)
    query = torch.randn(2, 6, 1, 16)  # GQA: 2 query heads per KV head
    scaling = 16**-0.5
    out = KERNELS[kernel](layer_problem(layer, query, scaling))
    segments_query = query.reshape(len(lengths), -1, 16)
    expected = naive_attention(segments_query, ref_keys, ref_values, lengths, scaling=scaling)
    nonempty = torch.tensor([n > 0 for n in lengths])
    assert torch.allclose(out[nonempty].double(), expected[nonempty], atol=1e-4)
    # The codes approximate the kept entries within half a quantization step (fp16 scales add a little).
    if bits < 16:
        error = (ref_keys - keys[keep]).abs().max()
        step = float(layer.flat_keys.scale.float().max())
        assert error <= 0.51 * step + 1e-3


@pytest.mark.parametrize("bits", [8, 4])
def test_decode_with_tail_matches_reference(bits):
    """Prompt entries quantized, generated tail in full precision: one softmax over both."""
    layer, _, _, _ = compressed_layer(bits, batch=1, heads=2, length=70)
    tail_keys, tail_values = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
    layer.update(tail_keys, tail_values)
    query = torch.randn(1, 2, 1, 16)
    lengths = list(layer.layout.lengths)
    keys = naive_dequantize(layer.flat_keys, lengths)
    values = naive_dequantize(layer.flat_values, lengths)
    expected = []
    offset = 0
    for head, n in enumerate(lengths):
        k = torch.cat([keys[offset : offset + n], tail_keys[0, head]])
        v = torch.cat([values[offset : offset + n], tail_values[0, head]])
        expected.append(torch.softmax(query[0, head] @ k.T * 0.25, -1) @ v)
        offset += n
    expected = torch.stack(expected)
    for kernel in CPU_KERNELS:
        out = KERNELS[kernel](layer_problem(layer, query, 0.25))
        assert torch.allclose(out, expected, atol=1e-5), kernel


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("bits", [None, 4])
def test_merged_identical_entries_with_log_count_bias_are_exact(kernel, bits):
    """A group of n identical entries stored once with log(n) added to its logit gives the unmerged attention."""
    generator = torch.Generator().manual_seed(3)
    dim, unique = 16, 12
    keys = torch.randn(unique, dim, generator=generator)
    values = torch.randn(unique, dim, generator=generator)
    counts = torch.randint(1, 6, (unique,), generator=generator)
    expanded_keys = keys.repeat_interleave(counts, 0)
    expanded_values = values.repeat_interleave(counts, 0)
    query = torch.randn(1, 1, 1, dim, generator=generator)
    merged = RaggedLayer()
    merged.update(keys[None, None], values[None, None])
    merged.compress(torch.ones(1, 1, unique, dtype=torch.bool), None, None if bits is None else QuantConfig(bits))
    merged.flat_bias = counts.float().log()
    unmerged = RaggedLayer()
    stored = naive_dequantize(merged.flat_keys, [unique]) if bits else keys
    stored_values = naive_dequantize(merged.flat_values, [unique]) if bits else values
    unmerged.update(
        stored.repeat_interleave(counts, 0)[None, None], stored_values.repeat_interleave(counts, 0)[None, None]
    )
    unmerged.compress(torch.ones(1, 1, int(counts.sum()), dtype=torch.bool))
    got = KERNELS[kernel](layer_problem(merged, query, 0.3))
    want = KERNELS["matmul"](layer_problem(unmerged, query, 0.3))
    assert torch.allclose(got, want, atol=1e-5)
    if bits is None:
        reference = torch.softmax(query[0, 0] @ expanded_keys.T * 0.3, -1) @ expanded_values
        assert torch.allclose(got[0], reference, atol=1e-5)


def test_sliding_layer_keys_per_token_survive_expiry():
    layer, keys, values, keep = compressed_layer(4, batch=1, heads=2, length=60, window=20)
    assert not layer.flat_keys.per_channel  # entries leave one at a time: keys per token
    before = naive_dequantize(layer.flat_keys, list(layer.layout.lengths))
    positions = layer.flat_positions.clone()
    layer.expire(70)
    after = naive_dequantize(layer.flat_keys, list(layer.layout.lengths))
    assert torch.equal(after, before[positions > 50])


@pytest.mark.parametrize("bits", [16, 8, 4, 2])
def test_kept_bytes_count_everything_allocated(bits):
    layer, _, _, keep = compressed_layer(bits)
    rows = layer.row_bytes()
    assert sum(rows) == layer.physical_bytes(include_tail=False)
    lengths = keep.sum(-1)  # [B, H]
    dim, config = 16, QuantConfig(bits, key_group=16, value_group=8)
    for row in range(2):
        expected = 0
        for n in lengths[row].tolist():
            if bits == 16:
                expected += n * 2 * dim * 2
            else:
                expected += n * (2 * dim * bits // 8 + (dim // 8) * 4) + math.ceil(n / 16) * dim * 4
            expected += 8  # the head's length
        assert rows[row] == expected


def test_budget_holds_and_spends_entries_and_bits():
    length, dim = 1500, 64
    full = byte_budget.full_bytes_16bit(length, 1, 1, dim)
    for budget in (0.5, 0.25, 0.125, 0.0625, 0.03125):
        for bits in (16, 8, 4, 2):
            entries = byte_budget.entries_within(budget, length, dim, bits)
            if entries < 0:
                continue
            assert byte_budget.segment_cost(entries, dim, bits) <= budget * full
            if entries < length:
                assert byte_budget.segment_cost(entries + 1, dim, bits) > budget * full
    # Quantization buys entries: at an eighth, 4-bit keeps several times what 16-bit keeps.
    assert byte_budget.entries_within(0.125, length, dim, 4) > 3 * byte_budget.entries_within(0.125, length, dim, 16)


def test_budget_resolution_refuses_what_cannot_fit():
    policy = build_policy("snapkv", 1.0, MethodOptions(kv_budget=0.01, kv_bits=16))
    with pytest.raises(AudiokvError, match="cannot hold"):
        byte_budget.resolve(policy, length=100, head_dim=64, forced=32, cross_attention=False)
    full = build_policy("full", 1.0, MethodOptions(kv_budget=0.1))
    with pytest.raises(AudiokvError, match="too small to keep every entry"):
        byte_budget.resolve(full, length=1500, head_dim=64, forced=0, cross_attention=True)
    quantized = byte_budget.resolve(
        build_policy("full", 1.0, MethodOptions(kv_budget=0.3)), length=1500, head_dim=64, forced=0,
        cross_attention=True,
    )
    assert (quantized.kv_bits, quantized.retention) == (4, 1.0)


@pytest.mark.parametrize("bits", [3, 0, 32])
def test_bad_bits_are_refused(bits):
    with pytest.raises(AudiokvError, match="--kv-bits"):
        build_policy("snapkv", 0.5, MethodOptions(kv_bits=bits))


@pytest.mark.parametrize("budget", [0.0, -0.5, 1.5])
def test_bad_budget_is_refused(budget):
    with pytest.raises(AudiokvError, match="--kv-budget"):
        build_policy("snapkv", 0.5, MethodOptions(kv_budget=budget))


def test_quantized_entries_never_hold_floats():
    layer, _, _, _ = compressed_layer(4)
    for entries in (layer.flat_keys, layer.flat_values):
        assert isinstance(entries, QuantizedEntries)
        assert entries.codes.dtype == torch.uint8
        assert entries.codes.shape[-1] == 16 * 4 // 8
