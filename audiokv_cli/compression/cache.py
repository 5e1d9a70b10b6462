"""A KV cache that physically holds only the kept prompt entries, a different number for every KV head.

Per layer the kept prompt entries of all (batch row, KV head) segments are stored flattened, `[N, head_dim]`, in
segment order with positions ascending inside a segment, plus one length per segment (AdaKV's layout). Tokens
generated after compression are appended to every head, so they form a dense `[B, Hkv, T, head_dim]` tail that grows
in chunks. Nothing evicted survives: after `compress` the dense prompt tensors are released. The segment layout the
decode kernels need (`decode_kernels.SegmentLayout`) is built once, at compress time.

Kept entries may be stored as packed low-bit codes (`quantization`, ``--kv-bits``): keys per channel, values per
token, dequantized on the fly by every decode kernel. The generated tail stays in the model's dtype: it is the
full-precision residual of the newest entries, and it is not part of the compressed prompt cache.

A sliding-window layer (a query at position t sees keys after t - window) also remembers each kept entry's
position; `expire` drops the entries a new query can no longer see, prompt and tail alike, as transformers' own
sliding cache does, so the decode kernels need no window mask.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from audiokv_cli.compression.decode_kernels import DecodeProblem, SegmentLayout, decode_attention, decode_problem
from audiokv_cli.compression.latent import LatentProjection, LatentStore, latent_attention
from audiokv_cli.compression.merging import merge_evicted
from audiokv_cli.compression.quantization import HalfEntries, QuantConfig, QuantizedEntries, store

# The generated-token tail grows by this many positions at a time, so appending a token is not a full copy.
TAIL_CHUNK = 64


class RaggedLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self):
        super().__init__()
        self.compressed = False
        self.prompt_length = 0
        self.flat_keys: torch.Tensor | QuantizedEntries | HalfEntries | None = None
        self.flat_values: torch.Tensor | QuantizedEntries | HalfEntries | None = None
        # A logit bias per kept entry (a merged entry's log-weight), or None.
        self.flat_bias: torch.Tensor | None = None
        self.segment_lengths: torch.Tensor | None = None
        self.layout: SegmentLayout | None = None
        self.tail_keys: torch.Tensor | None = None
        self.tail_values: torch.Tensor | None = None
        self.tail_length = 0
        # Sliding-window layers only: the window, each packed entry's position, tail tokens already expired.
        self.window: int | None = None
        self.flat_positions: torch.Tensor | None = None
        self.tail_dropped = 0
        # A cross-attention layer whose keys and values are read from the cache's shared encoder output instead.
        self.reads_latent = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not self.compressed:
            # Before compression the layer behaves like a dense dynamic cache.
            if self.keys is None:
                self.keys, self.values = key_states, value_states
            else:
                self.keys = torch.cat([self.keys, key_states], dim=-2)
                self.values = torch.cat([self.values, value_states], dim=-2)
            return self.keys, self.values
        self._append_tail(key_states, value_states)
        return key_states, value_states

    def _append_tail(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, new, dim = key_states.shape
        needed = self.tail_length + new
        if self.tail_keys is None or needed > self.tail_keys.shape[2]:
            capacity = -(-needed // TAIL_CHUNK) * TAIL_CHUNK
            grown_keys = key_states.new_empty(batch, heads, capacity, dim)
            grown_values = value_states.new_empty(batch, heads, capacity, dim)
            if self.tail_length:
                grown_keys[:, :, : self.tail_length] = self.tail_keys[:, :, : self.tail_length]
                grown_values[:, :, : self.tail_length] = self.tail_values[:, :, : self.tail_length]
            self.tail_keys, self.tail_values = grown_keys, grown_values
        self.tail_keys[:, :, self.tail_length : needed] = key_states
        self.tail_values[:, :, self.tail_length : needed] = value_states
        self.tail_length = needed

    def compress(
        self, keep: torch.Tensor, window: int | None = None, quant: QuantConfig | None = None, merge: str = "none"
    ) -> None:
        """Keep only ``keep[b, h, position]`` entries of the dense prompt cache and free the rest; ``window``: the
        layer attends over a sliding window of that many positions; ``quant``: store the kept entries as packed
        low-bit codes; ``merge``: fold the evicted entries into kept neighbours (`merging`; not on sliding-window
        layers, whose entries must leave the window one by one)."""
        if self.compressed:
            raise RuntimeError("layer is already compressed")
        batch, heads, length, _ = self.keys.shape
        if keep.shape != (batch, heads, length):
            raise ValueError(f"keep mask {tuple(keep.shape)} does not match cache {(batch, heads, length)}")
        # nonzero walks the mask row-major: segments in (batch, head) order, positions ascending within each.
        rows, kv_heads, positions = keep.nonzero(as_tuple=True)
        if merge not in (None, "none") and window is None:
            self.flat_keys, self.flat_values, self.flat_bias = merge_evicted(self.keys, self.values, keep, merge)
        else:
            self.flat_keys = self.keys[rows, kv_heads, positions].contiguous()
            self.flat_values = self.values[rows, kv_heads, positions].contiguous()
        if window is not None:
            self.window, self.flat_positions = window, positions.to(torch.int32)
        self.segment_lengths = keep.sum(-1).reshape(-1)
        self.layout = SegmentLayout.from_lengths(self.segment_lengths)
        if quant is not None:
            self.quantize(quant)
        self.prompt_length = length
        self.num_kv_heads = heads
        self.batch = batch
        self.keys = self.values = None
        self.compressed = True

    def release_to_latent(self) -> None:
        """Free the dense keys and values: this layer's attention is computed from the cache's `LatentStore`."""
        if self.compressed:
            raise RuntimeError("layer is already compressed")
        self.batch, self.num_kv_heads, self.prompt_length = self.keys.shape[0], self.keys.shape[1], self.keys.shape[2]
        self.keys = self.values = None
        self.reads_latent = self.compressed = True

    def quantize(self, quant: QuantConfig) -> None:
        """Store the packed entries as ``quant`` says: low-bit codes (keys per token where entries expire one by one)
        or float16."""
        self.flat_keys, self.flat_values = store(
            self.flat_keys, self.flat_values, self.layout, quant, per_token_keys=self.window is not None
        )

    @property
    def kv_bits(self) -> int:
        """Bits per stored element of the kept entries."""
        if isinstance(self.flat_keys, torch.Tensor):
            return 8 * self.flat_keys.element_size()
        return self.flat_keys.bits

    def replace_prompt(
        self, flat_keys: torch.Tensor, flat_values: torch.Tensor, lengths: torch.Tensor, prompt_length: int,
        num_kv_heads: int, batch: int,
    ) -> None:
        """Hold exactly these packed prompt entries (chunked prefill recompresses after every chunk); the dense
        prompt and the tail are released."""
        self.flat_keys, self.flat_values = flat_keys.contiguous(), flat_values.contiguous()
        self.segment_lengths = lengths.reshape(-1)
        self.layout = SegmentLayout.from_lengths(self.segment_lengths)
        self.prompt_length, self.num_kv_heads, self.batch = prompt_length, num_kv_heads, batch
        self.keys = self.values = self.tail_keys = self.tail_values = self.flat_bias = None
        self.tail_length = 0
        self.compressed = True

    def expire(self, query_position: int) -> None:
        """Sliding-window layer: drop every entry a query at ``query_position`` (and any later one) cannot see."""
        if self.window is None:
            return
        horizon = query_position - self.window  # entries at or before it are outside the window
        visible = self.flat_positions > horizon
        if not bool(visible.all()):
            segments = torch.repeat_interleave(
                torch.arange(self.segment_lengths.numel(), device=visible.device), self.segment_lengths
            )
            self.flat_keys = _select(self.flat_keys, visible)
            self.flat_values = _select(self.flat_values, visible)
            if self.flat_bias is not None:
                self.flat_bias = self.flat_bias[visible].contiguous()
            self.flat_positions = self.flat_positions[visible]
            self.segment_lengths = torch.bincount(segments[visible], minlength=self.segment_lengths.numel())
            self.layout = SegmentLayout.from_lengths(self.segment_lengths)
        tail_start = self.prompt_length + self.tail_dropped
        stale = min(max(0, horizon + 1 - tail_start), self.tail_length)
        if stale:
            # Shift the tail down; its capacity is kept for the tokens still to come.
            kept = self.tail_length - stale
            self.tail_keys[:, :, :kept] = self.tail_keys[:, :, stale : self.tail_length].clone()
            self.tail_values[:, :, :kept] = self.tail_values[:, :, stale : self.tail_length].clone()
            self.tail_length, self.tail_dropped = kept, self.tail_dropped + stale

    def get_seq_length(self) -> int:
        if self.compressed:
            return self.prompt_length + self.tail_dropped + self.tail_length
        if self.keys is None:
            return 0
        return self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        # transformers 5.0 names get_max_length this way (and declares it abstract).
        return -1

    def reset(self) -> None:
        self.__init__()

    def physical_bytes(self, include_tail: bool = True) -> int:
        """Bytes of storage the layer holds (allocated tail capacity included)."""
        tensors = [self.keys, self.values, self.segment_lengths, self.flat_positions, self.flat_bias]
        if include_tail:
            tensors += [self.tail_keys, self.tail_values]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None) + sum(
            _nbytes(entries) for entries in (self.flat_keys, self.flat_values) if entries is not None
        )

    def row_bytes(self) -> list[int]:
        """Bytes of each batch row's compressed prompt entries: codes or values, scales, the per-head length,
        positions and logit biases. They add up to `physical_bytes(include_tail=False)` of a compressed layer (a
        layer that reads the shared encoder output holds nothing of its own)."""
        if self.reads_latent:
            return [0] * self.batch
        lengths = list(self.layout.lengths)
        per_segment = [0] * len(lengths)
        for entries in (self.flat_keys, self.flat_values):
            if isinstance(entries, torch.Tensor):
                part = [n * entries.shape[-1] * entries.element_size() for n in lengths]
            else:
                part = entries.segment_bytes(lengths)
            per_segment = [a + b for a, b in zip(per_segment, part)]
        per_entry = sum(t.element_size() for t in (self.flat_positions, self.flat_bias) if t is not None)
        length_bytes = self.segment_lengths.element_size()
        per_segment = [total + n * per_entry + length_bytes for total, n in zip(per_segment, lengths)]
        heads = len(lengths) // self.batch
        return [sum(per_segment[row * heads : (row + 1) * heads]) for row in range(self.batch)]


class RaggedKVCache(Cache):
    """A transformers `Cache` whose layers can be compressed to per-head variable lengths."""

    def __init__(self, num_layers: int):
        super().__init__(layers=[RaggedLayer() for _ in range(num_layers)])
        #: the encoder output the cross-attention layers read instead of their own keys and values (`latent`)
        self.latent: LatentStore | None = None
        self.latent_layers: list[int] = []

    def compress_to_latent(self, layer_idx: int, build) -> None:
        """Layer ``layer_idx`` reads the shared encoder output from now on; ``build()`` makes the store the first
        time a layer asks for it (every layer reads the same one)."""
        if self.latent is None:
            self.latent = build()
        self.layers[layer_idx].release_to_latent()
        self.latent_layers.append(layer_idx)

    def latent_attention(
        self, layer_idx: int, query: torch.Tensor, scaling: float, projection: LatentProjection
    ) -> torch.Tensor:
        """Decode attention of a layer that reads the encoder output: the step's first such layer expands the
        stored frames, every layer of the step reads them, the last one frees them."""
        if layer_idx == self.latent_layers[0]:
            self.latent.release()
        frames, bias = self.latent.expand()
        out = latent_attention(frames, bias, query, projection, scaling)
        if layer_idx == self.latent_layers[-1]:
            self.latent.release()
        return out

    def compress_layer(
        self, layer_idx: int, keep: torch.Tensor, window: int | None = None, quant: QuantConfig | None = None,
        merge: str = "none",
    ) -> None:
        self.layers[layer_idx].compress(keep, window, quant, merge)

    def is_compressed(self, layer_idx: int) -> bool:
        return self.layers[layer_idx].compressed

    def physical_bytes(self, include_tail: bool = True) -> int:
        latent = 0 if self.latent is None else self.latent.nbytes
        return latent + sum(layer.physical_bytes(include_tail) for layer in self.layers)

    def kept_bytes(self) -> list[int]:
        """Per batch row: bytes of the compressed prompt cache (every compressed layer; the generated tail and the
        layers that were never compressed are not counted). The one place kept bytes are counted."""
        rows: list[int] | None = None if self.latent is None else self.latent.row_bytes()
        for layer in self.layers:
            if layer.compressed:
                part = layer.row_bytes()
                rows = part if rows is None else [a + b for a, b in zip(rows, part)]
        return rows or [0]


def _nbytes(entries) -> int:
    if isinstance(entries, torch.Tensor):
        return entries.numel() * entries.element_size()
    return entries.nbytes


def _select(entries, visible: torch.Tensor):
    if isinstance(entries, torch.Tensor):
        return entries[visible].contiguous()
    return entries.select(visible)


def layer_problem(layer: RaggedLayer, query: torch.Tensor, scaling: float) -> DecodeProblem:
    """The decode-kernel inputs of a compressed layer: its packed entries and views of its tail, no copies."""
    tail_keys = tail_values = None
    if layer.tail_length:
        segments, capacity, dim = layer.layout.segments, layer.tail_keys.shape[2], layer.tail_keys.shape[3]
        # [B, Hkv, capacity, D] is [S, capacity, D] in memory.
        tail_keys = layer.tail_keys.view(segments, capacity, dim)[:, : layer.tail_length]
        tail_values = layer.tail_values.view(segments, capacity, dim)[:, : layer.tail_length]
    return decode_problem(
        layer.layout, layer.flat_keys, layer.flat_values, tail_keys, tail_values, query, scaling, layer.flat_bias
    )


def ragged_decode_attention(
    layer: RaggedLayer, query: torch.Tensor, scaling: float, kernel: str | None = None
) -> torch.Tensor:
    """Attention of new queries over a compressed layer: per-head softmax over that head's kept keys plus the tail.

    query: [B, Hq, q_len, D] post-rotary. Returns [B, q_len, Hq, D] like transformers' attention functions.
    Each new query sees every kept prompt entry of its KV head and the tail up to itself (causal inside the tail);
    a layer whose tail is empty (cross-attention) is attended over its kept entries alone. ``kernel`` forces a
    backend of `decode_kernels` (default: ``--decode-kernel``, else chosen automatically).
    """
    return decode_attention(layer_problem(layer, query, scaling), query, kernel)
