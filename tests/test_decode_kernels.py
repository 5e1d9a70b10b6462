"""Every decode-attention backend that runs on this machine against a naive per-head softmax reference."""

import pytest
import torch

from audiokv_cli.compression.cache import RaggedLayer, layer_problem, ragged_decode_attention
from audiokv_cli.compression.decode_kernels import (
    KERNEL_ENV,
    SegmentLayout,
    available_kernels,
    check_kernel,
    resolve_kernel,
    select_kernel,
)
from audiokv_cli.errors import AudiokvError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def backends():
    return [
        pytest.param(device, dtype, name, id=f"{device}-{str(dtype)[6:]}-{name}")
        for device in DEVICES
        for dtype in (torch.float32, torch.bfloat16, torch.float16)
        for name in available_kernels(device, dtype)
    ]


def naive(query, kept_keys, kept_values, tail_keys, tail_values, scaling):
    """One query head and one query at a time: softmax over its KV head's kept keys and the visible tail."""
    batch, query_heads, q_len, dim = query.shape
    group = query_heads // len(kept_keys[0])
    tail = 0 if tail_keys is None else tail_keys.shape[2]
    out = torch.zeros(batch, q_len, query_heads, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(query_heads):
            kv = h // group
            for i in range(q_len):
                keys, values = kept_keys[b][kv].double(), kept_values[b][kv].double()
                if tail:  # the last q_len tail entries are the queries themselves: causal among them
                    visible = tail - q_len + i + 1
                    keys = torch.cat([keys, tail_keys[b, kv, :visible].double()])
                    values = torch.cat([values, tail_values[b, kv, :visible].double()])
                weights = torch.softmax(keys @ query[b, h, i].double() * scaling, dim=0)
                out[b, i, h] = weights @ values
    return out


def compressed_layer(batch, kv_heads, length, dim, keep, dtype, device, tail, q_len):
    keys = torch.randn(batch, kv_heads, length, dim)
    values = torch.randn(batch, kv_heads, length, dim)
    layer = RaggedLayer()
    layer.update(keys.to(device, dtype), values.to(device, dtype))
    layer.compress(keep.to(device))
    tail_k = tail_v = None
    if tail:
        tail_k = torch.randn(batch, kv_heads, tail + q_len, dim)
        tail_v = torch.randn(batch, kv_heads, tail + q_len, dim)
        # Two appends: the generated tail, then the queries' own entries (as a decode step does).
        layer.update(tail_k[:, :, :tail].to(device, dtype), tail_v[:, :, :tail].to(device, dtype))
        layer.update(tail_k[:, :, tail:].to(device, dtype), tail_v[:, :, tail:].to(device, dtype))
    kept_k = [[keys[b, h][keep[b, h]] for h in range(kv_heads)] for b in range(batch)]
    kept_v = [[values[b, h][keep[b, h]] for h in range(kv_heads)] for b in range(batch)]
    return layer, kept_k, kept_v, tail_k, tail_v


def rounded(tensor, dtype):
    return None if tensor is None else tensor.to(dtype).float()


CASES = [
    # batch, query heads, KV heads, q_len, tail before the queries, per-head budgets vary
    (1, 4, 4, 1, 5, True),  # MHA
    (1, 8, 2, 1, 5, True),  # GQA
    (2, 8, 2, 1, 70, True),  # batch 2, tail past one growth chunk
    (2, 4, 2, 3, 4, True),  # multi-token queries: causal inside the tail
    (2, 8, 2, 1, 3, False),  # uniform budgets: the packed cache is one [S, L, D] view
    (1, 8, 2, 4, 0, True),  # cross-attention: no tail ever, queries see every kept entry
    (2, 4, 4, 1, 0, False),  # cross-attention with uniform budgets
]


@pytest.mark.parametrize("device, dtype, kernel", backends())
@pytest.mark.parametrize("batch, query_heads, kv_heads, q_len, tail, ragged", CASES)
def test_backend_matches_naive(device, dtype, kernel, batch, query_heads, kv_heads, q_len, tail, ragged):
    torch.manual_seed(0)
    length, dim = 53, 16
    if ragged:
        keep = torch.rand(batch, kv_heads, length) < 0.4
        keep[..., -2:] = True
        keep[0, 0, :-2] = False  # one head keeps almost nothing
    else:
        keep = torch.zeros(batch, kv_heads, length, dtype=torch.bool)
        for b in range(batch):
            for h in range(kv_heads):
                keep[b, h, torch.randperm(length)[:21]] = True
    layer, kept_k, kept_v, tail_k, tail_v = compressed_layer(
        batch, kv_heads, length, dim, keep, dtype, device, tail, q_len
    )
    query = torch.randn(batch, query_heads, q_len, dim)
    got = ragged_decode_attention(layer, query.to(device, dtype), dim**-0.5, kernel=kernel)
    assert got.shape == (batch, q_len, query_heads, dim) and got.dtype == dtype
    # The reference sees the same rounded inputs, so only the kernel's arithmetic is measured.
    kept_k = [[k.to(dtype).float() for k in row] for row in kept_k]
    kept_v = [[v.to(dtype).float() for v in row] for row in kept_v]
    want = naive(rounded(query, dtype), kept_k, kept_v, rounded(tail_k, dtype), rounded(tail_v, dtype), dim**-0.5)
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(got.double().cpu(), want, atol=tolerance, rtol=tolerance)


def test_layout_built_once_at_compress():
    lengths = torch.tensor([3, 3, 5, 0, 2, 2])
    layout = SegmentLayout.from_lengths(lengths)
    assert layout.runs == ((0, 2, 3, 0), (2, 3, 5, 6), (3, 4, 0, 11), (4, 6, 2, 11))
    assert layout.cu_seqlens.tolist() == [0, 3, 6, 11, 11, 13, 15]
    assert layout.max_length == 5
    index, valid = layout.padded_index()
    assert index[2].tolist() == [6, 7, 8, 9, 10] and valid.sum(-1).tolist() == [3, 3, 5, 0, 2, 2]


def test_auto_picks_a_measured_backend():
    for keep in (torch.ones(1, 4, 40, dtype=torch.bool), torch.rand(1, 4, 40) < 0.5):
        layer, *_ = compressed_layer(1, 4, 40, 8, keep, torch.float32, "cpu", 2, 1)
        problem = layer_problem(layer, torch.randn(1, 8, 1, 8), 0.3)
        assert resolve_kernel("auto", problem) in ("matmul", "sdpa")
        assert resolve_kernel("padded", problem) == "padded"


def test_forced_kernel_is_checked(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "auto")  # restored after the test, whatever select_kernel sets
    with pytest.raises(AudiokvError, match="not available on cpu"):
        check_kernel("varlen", "cpu", torch.bfloat16)
    with pytest.raises(AudiokvError, match="unknown decode kernel"):
        select_kernel("fastest")
    select_kernel("padded")
    layer, *_ = compressed_layer(1, 2, 10, 8, torch.rand(1, 2, 10) < 0.5, torch.float32, "cpu", 2, 1)
    from audiokv_cli.compression import decode_kernels

    calls = []
    monkeypatch.setitem(decode_kernels.KERNELS, "padded", lambda problem: calls.append(1) or decode_kernels.matmul_kernel(problem))
    ragged_decode_attention(layer, torch.randn(1, 2, 1, 8), 0.3)
    assert calls == [1]


@pytest.mark.parametrize("method", ["snapkv", "adakv", "stride"])
def test_every_backend_decodes_the_same_tokens(random_adapter, method, monkeypatch):
    import numpy as np

    from audiokv_cli.compression.methods import build_policy
    from audiokv_cli.runtime.inference import run_clip

    clip = (np.random.default_rng(1).standard_normal(16000 * 6) * 0.1).astype(np.float32)
    policy = build_policy(method, 0.4)
    texts = {}
    for name in available_kernels("cpu", torch.float32):
        monkeypatch.setenv(KERNEL_ENV, name)
        texts[name] = run_clip(random_adapter, clip, policy, max_new_tokens=12, stop_at_eos=False).token_ids
    assert len(set(map(tuple, texts.values()))) == 1, texts


def test_cli_refuses_a_backend_this_machine_lacks(random_model_dir, tone_wav, monkeypatch):
    from typer.testing import CliRunner

    from audiokv_cli.cli import app

    monkeypatch.setenv(KERNEL_ENV, "auto")
    result = CliRunner().invoke(
        app, ["infer", str(tone_wav), "--model", str(random_model_dir), "--device", "cpu", "--decode-kernel", "flash-attn"]
    )
    assert result.exit_code == 1
    assert "decode kernel 'flash-attn' is not available on cpu" in result.output


@pytest.mark.parametrize("kernel", available_kernels("cpu", torch.float32))
@pytest.mark.parametrize("query_heads", [2, 8])
def test_prefill_chunk_over_its_own_tail(kernel, query_heads):
    """Chunked prefill: the tail holds exactly the chunk's queries (causal among them) next to the kept entries."""
    torch.manual_seed(1)
    batch, kv_heads, length, dim, q_len = 1, 2, 30, 16, 6
    keep = torch.rand(batch, kv_heads, length) < 0.5
    keep[..., -1] = True
    keys, values = torch.randn(batch, kv_heads, length, dim), torch.randn(batch, kv_heads, length, dim)
    layer = RaggedLayer()
    layer.update(keys, values)
    layer.compress(keep)
    tail_k, tail_v = torch.randn(batch, kv_heads, q_len, dim), torch.randn(batch, kv_heads, q_len, dim)
    layer.update(tail_k, tail_v)
    query = torch.randn(batch, query_heads, q_len, dim)
    got = ragged_decode_attention(layer, query, dim**-0.5, kernel=kernel)
    kept_k = [[keys[0, h][keep[0, h]] for h in range(kv_heads)]]
    kept_v = [[values[0, h][keep[0, h]] for h in range(kv_heads)]]
    want = naive(query, kept_k, kept_v, tail_k, tail_v, dim**-0.5)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_varlen_outputs_merge_with_the_tail():
    """What the CUDA varlen backends do after their kernel, on CPU: kept-part output and log-sum-exp in the
    kernels' packed layout (a segment that kept nothing carries garbage), merged with the tail."""
    from audiokv_cli.compression.decode_kernels import _varlen_result

    torch.manual_seed(2)
    kv_heads, dim, q_len, length = 3, 8, 2, 12
    keep = torch.rand(1, kv_heads, length) < 0.5
    keep[0, 1] = False  # head 1 keeps nothing: only its tail remains
    keep[0, 0, 0] = keep[0, 2, 0] = True
    layer, kept_k, kept_v, tail_k, tail_v = compressed_layer(1, kv_heads, length, dim, keep, torch.float32, "cpu", 3, q_len)
    query = torch.randn(1, kv_heads * 2, q_len, dim)
    problem = layer_problem(layer, query, dim**-0.5)
    outs, lses = [], []
    for h in range(kv_heads):
        scores = problem.queries[h] @ kept_k[0][h].T * dim**-0.5
        outs.append(torch.softmax(scores, -1) @ kept_v[0][h] if len(kept_k[0][h]) else torch.zeros(4, dim))
        lses.append(torch.logsumexp(scores, -1) if len(kept_k[0][h]) else torch.full((4,), float("inf")))
    got = _varlen_result(problem, torch.stack(outs).reshape(-1, 1, dim), torch.stack(lses).reshape(1, -1))
    got = got.reshape(1, kv_heads * 2, q_len, dim).transpose(1, 2)
    want = naive(query, kept_k, kept_v, tail_k, tail_v, dim**-0.5)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
