"""The ragged cache against naive references, and compressed inference end to end on a tiny random model."""

import numpy as np
import pytest
import torch

from audiokv_cli.compression.cache import RaggedLayer, ragged_decode_attention
from audiokv_cli.compression.methods import METHODS, MethodOptions, build_policy
from audiokv_cli.compression.policy import CompressionSession, apply_policy
from audiokv_cli.runtime.attention import use_attention_handler
from audiokv_cli.compat import cache_kwargs
from audiokv_cli.runtime.decoding import prefill


def naive_attention(query, kept_keys, kept_values, tail_keys, tail_values, scaling):
    """Per query head: softmax over its KV head's kept prompt keys plus the tail, one head at a time."""
    batch, query_heads, q_len, dim = query.shape
    kv_heads = len(kept_keys[0])
    group = query_heads // kv_heads
    out = torch.zeros(batch, q_len, query_heads, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(query_heads):
            kv = h // group
            for i in range(q_len):
                visible_tail = tail_keys.shape[2] - q_len + i + 1
                keys = torch.cat([kept_keys[b][kv], tail_keys[b, kv, :visible_tail]]).double()
                values = torch.cat([kept_values[b][kv], tail_values[b, kv, :visible_tail]]).double()
                weights = torch.softmax(keys @ query[b, h, i].double() * scaling, dim=0)
                out[b, i, h] = weights @ values
    return out


@pytest.mark.parametrize("batch, query_heads, kv_heads, q_len", [(1, 4, 2, 1), (1, 8, 2, 1), (2, 4, 4, 1), (1, 4, 2, 3)])
def test_ragged_attention_matches_naive(batch, query_heads, kv_heads, q_len):
    torch.manual_seed(0)
    length, dim = 37, 8
    keys = torch.randn(batch, kv_heads, length, dim)
    values = torch.randn(batch, kv_heads, length, dim)
    keep = torch.rand(batch, kv_heads, length) < 0.4
    keep[:, :, -2:] = True  # every head keeps something, one head keeps nearly nothing
    keep[0, 0, :-2] = False
    layer = RaggedLayer()
    layer.update(keys, values)
    layer.compress(keep)
    tail_k = torch.randn(batch, kv_heads, 5 + q_len, dim)
    tail_v = torch.randn(batch, kv_heads, 5 + q_len, dim)
    layer.update(tail_k[:, :, :5], tail_v[:, :, :5])
    layer.update(tail_k[:, :, 5:], tail_v[:, :, 5:])
    query = torch.randn(batch, query_heads, q_len, dim)
    got = ragged_decode_attention(layer, query, scaling=dim**-0.5)
    kept_keys = [[keys[b, h][keep[b, h]] for h in range(kv_heads)] for b in range(batch)]
    kept_values = [[values[b, h][keep[b, h]] for h in range(kv_heads)] for b in range(batch)]
    want = naive_attention(query, kept_keys, kept_values, tail_k, tail_v, dim**-0.5)
    assert got.shape == (batch, q_len, query_heads, dim)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_compress_frees_evicted_entries():
    layer = RaggedLayer()
    keys = torch.randn(1, 2, 100, 16)
    layer.update(keys, keys.clone())
    full = layer.physical_bytes()
    keep = torch.zeros(1, 2, 100, dtype=torch.bool)
    keep[0, 0, :30] = True
    keep[0, 1, :50] = True
    layer.compress(keep)
    assert layer.keys is None and layer.values is None
    assert layer.flat_keys.shape == (80, 16)
    assert layer.segment_lengths.tolist() == [30, 50]
    assert layer.physical_bytes() == 80 * 16 * 4 * 2 + 2 * 8
    assert layer.physical_bytes() < 0.41 * full
    assert layer.get_seq_length() == 100  # positions of new tokens continue after the full prompt


def _clip(seconds=6.0, seed=0):
    return (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


def _prefill_logits(adapter, prepared, policy):
    session = CompressionSession(policy, adapter, prepared)
    with use_attention_handler(adapter, session), torch.no_grad():
        logits, _ = prefill(adapter, prepared.inputs, session.cache)
        step = adapter.next_token_logits({"input_ids": logits.argmax(-1)[:, None]}, session.cache)
    return logits, step, session


def test_retention_one_is_lossless(random_adapter):
    prepared = random_adapter.prepare(_clip())
    base_first, base_step, _ = _prefill_logits(random_adapter, prepared, build_policy("full"))
    with torch.no_grad():
        reference = random_adapter.model.generate(**prepared.inputs, max_new_tokens=12, do_sample=False)
    for method in ("snapkv", "adakv", "stride"):
        policy = build_policy(method, 1.0)
        first, step, session = _prefill_logits(random_adapter, prepared, policy)
        assert all(session.cache.is_compressed(i) for i in range(random_adapter.geometry.num_layers))
        torch.testing.assert_close(first, base_first, atol=1e-5, rtol=0)
        torch.testing.assert_close(step, base_step, atol=1e-5, rtol=0)
        with apply_policy(policy, random_adapter, prepared) as generating:
            out = random_adapter.model.generate(
                **prepared.inputs, **cache_kwargs(random_adapter.model, generating.cache), max_new_tokens=12, do_sample=False
            )
        assert out.tolist() == reference.tolist()


def _profile_scores(adapter):
    geometry = adapter.geometry
    return torch.arange(geometry.num_layers * geometry.num_query_heads, dtype=torch.float32).reshape(
        geometry.num_layers, geometry.num_query_heads
    )


@pytest.mark.parametrize("scope", ["all", "audio"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_on_every_scope(random_adapter, method, scope):
    retention = 0.4
    prepared = random_adapter.prepare(_clip(8.0))
    options = MethodOptions(window=8, scope=scope, head_scores=_profile_scores(random_adapter))
    policy = build_policy(method, retention, options)
    _, step, session = _prefill_logits(random_adapter, prepared, policy)
    assert torch.isfinite(step).all()
    length = prepared.prompt_tokens
    full_bytes = length * random_adapter.geometry.kv_bytes_per_token(torch.float32)
    if method == "full":
        assert session.cache.physical_bytes() >= full_bytes
        return
    kept = torch.tensor(session.summary()["kept"])
    text = torch.tensor(session.summary()["text_kept"])
    audio = torch.tensor(session.summary()["audio_kept"])
    assert (kept == text + audio).all()
    if scope == "audio":
        assert (text == length - prepared.audio_tokens).all()  # every text token stays
    else:
        # Each layer keeps exactly what its allocator granted, and the layers' total is the nominal budget.
        per_head = round(retention * length)
        assert kept.sum() == per_head * kept.numel()
        assert session.kept_bytes() <= (retention + 0.01) * full_bytes


def test_window_always_kept(random_adapter):
    prepared = random_adapter.prepare(_clip(8.0))
    policy = build_policy("random", 0.2, MethodOptions(window=16))
    session = CompressionSession(policy, random_adapter, prepared)
    captured = {}
    original = session.cache.compress_layer

    def spy(layer_idx, keep, *args):
        captured[layer_idx] = keep.clone()
        original(layer_idx, keep, *args)

    session.cache.compress_layer = spy
    with use_attention_handler(random_adapter, session):
        prefill(random_adapter, prepared.inputs, session.cache)
    for keep in captured.values():
        assert keep[..., -16:].all()
        assert (keep.sum(-1) == round(0.2 * prepared.prompt_tokens)).all()


@pytest.mark.parametrize("retention", [0.05, 0.1, 0.4, 0.8])
def test_kept_bytes_bounded_by_retention_plus_window(random_adapter, retention):
    prepared = random_adapter.prepare(_clip(4.0))
    window = 32
    policy = build_policy("snapkv", retention, MethodOptions(window=window))
    _, _, session = _prefill_logits(random_adapter, prepared, policy)
    length = prepared.prompt_tokens
    per_token = random_adapter.geometry.kv_bytes_per_token(torch.float32)
    full_bytes = length * per_token
    allowance = window * per_token if retention * length < window else 0
    assert session.kept_bytes() <= (retention + 0.01) * full_bytes + allowance
    assert session.full_prompt_bytes == full_bytes  # measured from the dense tensors before eviction
