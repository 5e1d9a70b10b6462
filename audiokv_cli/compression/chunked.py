"""Bounded-memory prefill: the prompt goes through the decoder in chunks, every layer compressed after each chunk.

One-shot prefill holds a full dense layer (and attention over the whole prompt), so its peak grows with the audio.
Here a layer attends with a chunk's queries over its kept entries plus the chunk itself (the decode kernels,
causal inside the chunk), then keeps, per KV head, the policy's final budget among everything it holds: scores come
from the chunk's last `window` queries, smoothing runs over the entries still held (in position order), and the
chunk's last window is always kept. Peak KV is about the kept budget plus one chunk of one layer, whatever the
prompt length. The audio tower still runs once over all the audio; its output embeddings are small next to KV.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from audiokv_cli.runtime.attention import sdpa_attention, use_attention_handler
from audiokv_cli.compat import cache_kwargs
from audiokv_cli.compression.cache import ragged_decode_attention
from audiokv_cli.compression.policy import CompressionPolicy, CompressionSession
from audiokv_cli.compression.selection import select_positions
from audiokv_cli.runtime.decoding import synchronize
from audiokv_cli.errors import AudiokvError

# Scorers that rank entries by attention; the others rank by index and need positions a chunked layer no longer has.
ATTENTION_SCORERS = ("window", "h2o")


class _Captured(Exception):
    """Raised by the pre-hook once the decoder's inputs are in hand: the rest of the forward is not needed."""


def check_chunked(policy: CompressionPolicy, chunk: int) -> None:
    if chunk < 1:
        raise AudiokvError(f"--prefill-chunk must be at least 1, got {chunk}")
    if policy.kv_bits is not None or policy.kv_budget is not None or policy.merge_mode != "none" or policy.hf_cache:
        # Each chunk recompresses the kept entries; packed codes and merged groups would be re-read lossily.
        raise AudiokvError("--prefill-chunk does not combine with --kv-bits, --kv-budget, --merge or hf-* methods yet")
    scorer = getattr(policy.scorer, "name", None)
    if policy.evicts and scorer not in ATTENTION_SCORERS:
        raise AudiokvError(
            f"--prefill-chunk needs a method that scores by attention ({', '.join(ATTENTION_SCORERS)} scorers); "
            f"{policy.name} ranks positions by index"
        )


def _text_model(adapter) -> torch.nn.Module:
    """The decoder stack (embeddings, layers, final norm) that the compressed attention modules belong to."""
    first = adapter.decoder_layers()[0]
    for module in adapter.model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) and any(m is first for m in layers[0].modules()):
            return module
    raise AudiokvError(f"{adapter.name}: cannot find the text decoder for chunked prefill")


def decoder_inputs(adapter, inputs: dict) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None]:
    """The decoder's input embeddings (audio merged in) and explicit position ids, from the model's own forward."""
    text_model = _text_model(adapter)
    captured = {}

    def hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = module.embed_tokens(kwargs.get("input_ids", args[0] if args else None))
        captured.update(embeds=embeds, positions=kwargs.get("position_ids"))
        raise _Captured

    handle = text_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            adapter.model(**inputs, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "embeds" not in captured:
        raise AudiokvError(f"{adapter.name}: the text decoder was never called; chunked prefill cannot run")
    positions = captured["positions"]
    if positions is not None and positions.dim() == 3:
        raise AudiokvError(f"{adapter.name}: multimodal rotary positions are not supported with --prefill-chunk yet")
    return text_model, captured["embeds"], positions


class ChunkedSession(CompressionSession):
    """A session that compresses every layer after every chunk of the prompt (see the module docstring)."""

    def __init__(self, policy: CompressionPolicy, adapter, prepared, chunk: int):
        check_chunked(policy, chunk)
        layers = adapter.compressed_layers()
        if adapter.compressed_attention == "cross":
            raise AudiokvError(
                f"--prefill-chunk does not apply to {adapter.name}: its compressed cache is cross-attention over the "
                "encoder's frames, filled in one step"
            )
        if len(layers) != adapter.geometry.num_layers or any(adapter.sliding_window(i) for i in layers):
            raise AudiokvError(
                f"--prefill-chunk does not support {adapter.name}: its layers share caches or attend over a sliding window"
            )
        super().__init__(policy, adapter, prepared)
        self.chunk = chunk
        self.prefilling = True
        self.seen = 0  # prompt tokens in the cache before the current chunk
        self.positions: dict[int, torch.Tensor] = {}  # layer -> prompt position of every packed entry

    def __call__(self, module, query, key, value, attention_mask, scaling, **kwargs):
        layer_idx = module.layer_idx
        layer = self.cache.layers[layer_idx]
        if layer.compressed:
            output = ragged_decode_attention(layer, query, scaling), None
        else:
            output = sdpa_attention(module, query, key, value, attention_mask, scaling, **kwargs)
        if self.prefilling:
            self.peak_prefill_bytes = max(self.peak_prefill_bytes, self.cache.physical_bytes(include_tail=True))
            self.compress_chunk(layer_idx, query, scaling)
        return output

    def _held(self, layer_idx: int):
        """Everything the layer holds, padded per segment in position order: keys, values, positions, valid."""
        layer = self.cache.layers[layer_idx]
        if not layer.compressed:
            batch, heads, length, dim = layer.keys.shape
            positions = torch.arange(length, device=layer.keys.device).expand(batch * heads, length)
            valid = torch.ones_like(positions, dtype=torch.bool)
            return layer.keys.reshape(-1, length, dim), layer.values.reshape(-1, length, dim), positions, valid
        index, valid = layer.layout.padded_index()
        keys, values = layer.flat_keys[index], layer.flat_values[index]
        positions = self.positions[layer_idx][index]
        if layer.tail_length:
            segments, capacity, dim = layer.layout.segments, layer.tail_keys.shape[2], layer.tail_keys.shape[3]
            tail = layer.tail_length
            keys = torch.cat([keys, layer.tail_keys.view(segments, capacity, dim)[:, :tail]], dim=1)
            values = torch.cat([values, layer.tail_values.view(segments, capacity, dim)[:, :tail]], dim=1)
            new = torch.arange(self.seen, self.seen + tail, device=keys.device).expand(segments, tail)
            positions = torch.cat([positions, new], dim=1)
            valid = torch.cat([valid, torch.ones_like(new, dtype=torch.bool)], dim=1)
        return keys, values, positions, valid

    def compress_chunk(self, layer_idx: int, query: torch.Tensor, scaling: float) -> None:
        layer = self.cache.layers[layer_idx]
        keys, values, positions, valid = self._held(layer_idx)
        segments, held, dim = keys.shape
        batch = query.shape[0]
        kv_heads = segments // batch
        if self.policy.evicts:
            grid = keys.view(batch, kv_heads, held, dim)
            scores = self.policy.scorer.score(query, grid, scaling).float()
            # Padding slots take the lowest real score: neutral for smoothing and budgets, never chosen.
            floor = scores.masked_fill(~valid.view_as(scores), float("inf")).amin(-1, keepdim=True)
            scores = torch.where(valid.view_as(scores), scores, floor)
            # The chunk sits in the last columns of every segment, so its last window is the same columns for all
            # heads: always kept, and left out of the smoothed sequence as one-shot compression does.
            end = self.seen + query.shape[-2]
            window = torch.zeros(held, dtype=torch.bool, device=keys.device)
            window[held - min(self.policy.window, query.shape[-2]) :] = True
            scores = self.policy.smooth_evictable(scores, ~window)
            forced = window.expand(segments, held).clone()
            if self.policy.scope == "audio":
                audio = self.audio_position_mask(end, keys.device)
                forced |= ~audio[positions.clamp(max=end - 1)]
            forced = (forced & valid).view(batch, kv_heads, held)
            ranked = scores.masked_fill(~valid.view_as(scores), float("nan"))
            # Budgets over the held columns that add up to the final prompt's budget (all of them while it fits).
            final = self.context.per_head
            context = replace(
                self.context, retention=min(1.0, final / held), prompt_len=held, window=int(window.sum()),
                scope="all", audio_spans=(),
            )
            available = valid.view(batch, kv_heads, held).sum(-1)
            keep = torch.stack([
                select_positions(
                    ranked[row],
                    torch.minimum(
                        self.policy.budget.allocate(layer_idx, scores[row : row + 1], context).to(keys.device),
                        available[row],
                    ),
                    forced[row],
                )
                for row in range(batch)
            ]).reshape(segments, held)
            keep &= valid
        else:
            keep = valid
        layer.replace_prompt(keys[keep], values[keep], keep.sum(-1), self.seen + query.shape[-2], kv_heads, batch)
        self.positions[layer_idx] = positions[keep]


def chunked_prefill(adapter, prepared, session: ChunkedSession) -> tuple[torch.Tensor, float]:
    """Prefill ``prepared`` chunk by chunk under ``session``; next-token logits ``[B, vocab]`` and seconds taken."""
    synchronize(adapter.device)
    start = time.perf_counter()
    with use_attention_handler(adapter, session), torch.no_grad():
        text_model, embeds, positions = decoder_inputs(adapter, prepared.inputs)
        length = embeds.shape[1]
        for first in range(0, length, session.chunk):
            last = min(length, first + session.chunk)
            session.seen = first
            kwargs = {"inputs_embeds": embeds[:, first:last], "use_cache": True}
            kwargs.update(cache_kwargs(text_model, session.cache))
            if positions is not None:
                kwargs["position_ids"] = positions[..., first:last]
            hidden = text_model(**kwargs).last_hidden_state
        session.prefilling = False
        logits = adapter.model.get_output_embeddings()(hidden[:, -1])
    synchronize(adapter.device)
    return logits, time.perf_counter() - start
