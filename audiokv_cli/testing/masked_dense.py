"""The end-to-end reference for compressed decoding: a dense cache with the evicted entries masked out.

Eviction only removes entries from attention, so a compressed run must give, at every decode step, the logits of the
same model run over a dense cache in which each KV head cannot see the prompt entries it evicted. The keep masks are
taken from the compressed run itself (a cache that records them); the reference attends in float32 with an explicit
per-head mask, independent of the ragged cache and its decode kernel. Every adapter's tests run this check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from audiokv_cli.runtime.attention import sdpa_attention, use_attention_handler
from audiokv_cli import runtime
from audiokv_cli.compression.cache import RaggedKVCache
from audiokv_cli.compression.policy import CompressionPolicy, CompressionSession


class RecordingRaggedCache(RaggedKVCache):
    """A ragged cache that remembers which prompt entries each layer kept."""

    def __init__(self, num_layers: int):
        super().__init__(num_layers)
        self.keep_masks: dict[int, torch.Tensor] = {}

    def compress_layer(self, layer_idx: int, keep: torch.Tensor, *storage) -> None:
        self.keep_masks[layer_idx] = keep.detach().clone()
        super().compress_layer(layer_idx, keep, *storage)


class MaskedDenseAttention:
    """Attention handler: full attention over the prompt, then decode steps that skip each head's evicted entries."""

    def __init__(self, keep_masks: dict[int, torch.Tensor], prompt_tokens: int, adapter=None):
        self.keep_masks = keep_masks
        self.prompt_tokens = prompt_tokens
        self.layer_index = adapter.cache_layer_index if adapter is not None else (lambda module: module.layer_idx)
        self.cross_attention = adapter is not None and adapter.compressed_attention == "cross"
        self.prefilled: set[int] = set()  # ids of the attention modules that have run their prefill

    def __call__(self, module, query, key, value, attention_mask, scaling, **kwargs):
        layer = self.layer_index(module)
        keep = self.keep_masks.get(layer) if layer is not None else None
        if keep is None or id(module) not in self.prefilled:
            # The first call of a module is its prefill: full attention, as in the compressed run (a layer that
            # reads another layer's cache has its own first call).
            self.prefilled.add(id(module))
            return sdpa_attention(module, query, key, value, attention_mask, scaling, **kwargs)
        length = key.shape[-2]
        batch, query_heads, q_len, _ = query.shape
        group = query_heads // key.shape[1]
        allowed = torch.ones(batch, key.shape[1], q_len, length, dtype=torch.bool, device=query.device)
        allowed[..., : self.prompt_tokens] = keep[:, :, None, :].to(query.device)
        if not self.cross_attention:
            # Causal among the new tokens (a multi-token step sees only itself and earlier ones).
            positions = torch.arange(length, device=query.device)
            allowed &= positions[None, :] <= (positions[-q_len:])[:, None]
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            # The model's own mask (a sliding window) applies on top of the evictions.
            allowed &= attention_mask[..., -q_len:, -length:].to(query.device)
        allowed = allowed.repeat_interleave(group, dim=1)
        keys = key.float().repeat_interleave(group, dim=1)
        values = value.float().repeat_interleave(group, dim=1)
        scores = (query.float() @ keys.transpose(-1, -2)) * scaling
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        return (weights @ values).transpose(1, 2).to(query.dtype), None


def logit_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference; logits both runs suppress (-inf in both) count as equal."""
    return float(torch.where(a == b, torch.zeros_like(a), a - b).abs().max())


@dataclass
class MaskedDenseComparison:
    compressed: list[torch.Tensor]  # logits after prefill and after each decode step, compressed cache
    masked_dense: list[torch.Tensor]  # the same steps over a dense cache with evicted entries masked
    full: list[torch.Tensor]  # the same steps over the full cache (nothing masked)
    keep_masks: dict[int, torch.Tensor]
    tokens: list[int]

    @property
    def max_difference(self) -> float:
        return max(logit_difference(a, b) for a, b in zip(self.compressed, self.masked_dense))

    @property
    def evicted_fraction(self) -> float:
        kept = sum(int(mask.sum()) for mask in self.keep_masks.values())
        total = sum(mask.numel() for mask in self.keep_masks.values())
        return 1.0 - kept / total if total else 0.0


def _teacher_forced(adapter, inputs: dict, cache, tokens: list[int], handler) -> list[torch.Tensor]:
    with torch.no_grad(), use_attention_handler(adapter, handler):
        logits = [adapter.next_token_logits(inputs, cache)]
        for token in tokens:
            step = torch.tensor([[token]], device=adapter.device)
            logits.append(adapter.next_token_logits({"input_ids": step}, cache))
    return logits


def compare_with_masked_dense(adapter, prepared, policy: CompressionPolicy, steps: int = 4) -> MaskedDenseComparison:
    """Greedy-decode ``steps`` tokens with ``policy``, then replay the same tokens over a masked dense cache and over
    the full cache (both fresh `DynamicCache`s)."""
    from transformers import DynamicCache

    cache = RecordingRaggedCache(adapter.geometry.num_layers)
    session = CompressionSession(policy, adapter, prepared, cache=cache)
    # The compressed side is the runtime every command uses; the reference below shares none of it.
    output = runtime.run(adapter, session, prepared.inputs, steps, keep_logits=True)
    tokens, compressed = output.tokens[0], output.logits
    reference = MaskedDenseAttention(cache.keep_masks, prepared.compressed_length, adapter)
    masked = _teacher_forced(adapter, prepared.inputs, adapter.model_cache(DynamicCache()), tokens, reference)
    full = _teacher_forced(adapter, prepared.inputs, adapter.model_cache(DynamicCache()), tokens, None)
    return MaskedDenseComparison(compressed, masked, full, cache.keep_masks, tokens)


def assert_matches_masked_dense(adapter, prepared, policy: CompressionPolicy, steps: int = 4, atol: float = 1e-5):
    """The check every adapter's tests run: compressed logits equal the masked dense ones at every step, and the
    comparison is not vacuous (entries were evicted in every layer, and they changed the logits)."""
    result = compare_with_masked_dense(adapter, prepared, policy, steps)
    assert sorted(result.keep_masks) == adapter.compressed_layers() and result.keep_masks
    assert all(not bool(mask.all()) for mask in result.keep_masks.values()), "a layer evicted nothing"
    assert result.max_difference <= atol, f"compressed vs masked dense: {result.max_difference:.2e} > {atol:g}"
    # Prefill logits are exact either way; after it, eviction must show in the full-cache run's logits.
    moved = max(logit_difference(a, b) for a, b in zip(result.compressed[1:], result.full[1:]))
    assert moved > 10 * atol, "evicting entries did not change any logits: the comparison proves nothing"
    return result


class SpikePlanter:
    """Attention handler around another one: at each compressed layer's prefill the key at ``position`` is replaced
    (in the scored copy only) by one that every observation-window query attends to almost entirely, and the share
    of attention it draws is measured with a dense softmax of its own, so a check knows the spike is real."""

    def __init__(self, inner, adapter, position: int, window: int, margin: float = 12.0):
        self.inner = inner
        self.adapter = adapter
        self.position = position
        self.window = window
        self.margin = margin  # logit lead of the spike over every other entry, for every window query
        self.spike_attention: dict[int, torch.Tensor] = {}  # layer -> [kv head] least attention a window query gives
        self.prefilled: set[int] = set()

    def __call__(self, module, query, key, value, attention_mask, scaling, **kwargs):
        layer = self.adapter.cache_layer_index(module)
        first_call = id(module) not in self.prefilled
        self.prefilled.add(id(module))
        if layer is None or not first_call or layer != module.layer_idx:
            return self.inner(module, query, key, value, attention_mask, scaling, **kwargs)
        key = key.clone()
        group = query.shape[1] // key.shape[1]
        # The window's queries: the last `window` prompt positions (cross-attention: every decoder prompt query).
        window_queries = query[..., -min(self.window, query.shape[-2]) :, :].float()
        for head in range(key.shape[1]):
            rows = window_queries[0, head * group : (head + 1) * group].reshape(-1, query.shape[-1])
            # The key that gives every window query the same score (least squares): a spike they all look at.
            direction = torch.linalg.pinv(rows) @ torch.ones(rows.shape[0], device=rows.device)
            own = (rows @ direction) * scaling
            others = (rows @ key[0, head].float().T) * scaling
            others[:, self.position] = float("-inf")
            scale = float(((others.max(-1).values + self.margin) / own).max().clamp(min=1.0))
            key[0, head, self.position] = (direction * scale).to(key.dtype)
        scores = (window_queries @ key.float().repeat_interleave(group, dim=1).transpose(-1, -2)) * scaling
        share = scores.softmax(-1)[..., self.position]  # [batch, query heads, window]
        self.spike_attention[layer] = share[0].reshape(key.shape[1], -1).min(-1).values
        return self.inner(module, query, key, value, attention_mask, scaling, **kwargs)


def assert_keeps_planted_spike(adapter, prepared, policy: CompressionPolicy, position: int | None = None):
    """Which entries a method keeps, checked where the answer is known: a prompt entry that every window query
    attends to (a planted spike, confirmed by a dense softmax) is kept by every head of every compressed layer, while
    other entries are evicted. The spike sits in the middle of the first audio span unless ``position`` says."""
    if position is None:
        start, end = prepared.audio_spans[0]
        position = (start + end) // 2
    cross_attention = adapter.compressed_attention == "cross"
    assert cross_attention or position < prepared.compressed_length - policy.window, "the spike is in the window"
    cache = RecordingRaggedCache(adapter.geometry.num_layers)
    session = CompressionSession(policy, adapter, prepared, cache=cache)
    planter = SpikePlanter(session, adapter, position, policy.window)
    with torch.no_grad(), use_attention_handler(adapter, planter):
        adapter.next_token_logits(prepared.inputs, session.model_cache)
    assert sorted(cache.keep_masks) == adapter.compressed_layers()
    for layer, keep in cache.keep_masks.items():
        assert bool((planter.spike_attention[layer] > 0.99).all()), f"layer {layer}: the planted spike is weak"
        assert not bool(keep.all()), f"layer {layer} evicted nothing"
        assert bool(keep[..., position].all()), f"layer {layer}: a head evicted the spike {keep[0, :, position]}"
    return cache.keep_masks
