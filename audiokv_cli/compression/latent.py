"""The cross-attention cache stored once, as the encoder output every layer's keys and values are made from.

In an encoder-decoder such as Whisper every decoder layer l reads the encoded audio ``X`` (``[frames, d_model]``)
through keys ``X Wk_l^T`` and values ``X Wv_l^T + bv_l``: 2 x layers linear maps of one tensor. Holding ``X``
instead of the per-layer keys and values is exact and takes 1 / (2 x layers) of the bytes at the same precision
(1/12 on Whisper base, 1/64 on Whisper large). Attention then runs on ``X`` with the projections folded into the
query and the output, as multi-head latent attention does:

    q . k_j = q . (Wk_h x_j) = (Wk_h^T q) . x_j             (a key bias adds the same to every logit: it cancels)
    sum_j p_j v_j = Wv_h (sum_j p_j x_j) + bv_h              (the weights sum to one)

What the byte budget then spends is this one tensor's frames and bits: frames merged into groups (the mean of a
group's rows with log(size) added to its logit, exactly the group's attention when its rows are alike; groups
uneven, each dropped frame joining its more similar kept neighbour, `merging`) and stored as per-token codes
(`quantization`, one scale and minimum per 64 channels). Every head and layer reads the same frames: there is no
per-head choice to make, which is why the per-head methods keep the per-layer cache (`--cross-store kv`).

A decode step expands the stored frames once (`LatentStore.expand`) for all layers of the step and frees them after
the last one: the same transient the per-layer kernels make for each layer, one for the whole step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from audiokv_cli.compression.merging import merge_evicted
from audiokv_cli.compression.quantization import HalfEntries, QuantConfig, QuantizedEntries, quantize_values
from audiokv_cli.compression.scorers import bit_reversal_rank

# Where the cross-attention cache of an encoder-decoder is kept: per layer and head ("kv"), or once ("latent").
CROSS_STORES = ("kv", "latent", "auto")
# Bytes of each row's frame count (int64).
LENGTH_BYTES = 8


@dataclass(frozen=True)
class LatentProjection:
    """One decoder layer's cross-attention maps from the encoder output: keys ``[H, head_dim, d_model]``, values
    the same and their bias ``[H, head_dim]`` (None without one). Views of the model's weights, no copies."""

    key_weight: torch.Tensor
    value_weight: torch.Tensor
    value_bias: torch.Tensor | None

    @classmethod
    def from_linear(cls, key_proj: torch.nn.Linear, value_proj: torch.nn.Linear, heads: int) -> "LatentProjection":
        dim = key_proj.in_features
        head_dim = key_proj.out_features // heads
        bias = None if value_proj.bias is None else value_proj.bias.view(heads, head_dim)
        return cls(key_proj.weight.view(heads, head_dim, dim), value_proj.weight.view(heads, head_dim, dim), bias)


def evenly_spaced_frames(length: int, count: int) -> torch.Tensor:
    """bool ``[length]``: ``count`` frames spread evenly over the window (a prefix of the bit-reversal order, so the
    spacing is even for any count)."""
    return bit_reversal_rank(length) < max(0, min(count, length))


@dataclass
class LatentStore:
    """The encoder output of every batch row, as kept: ``[N, d_model]`` rows (row 0's frames, then row 1's ...),
    stored as floats, float16 or per-token codes; one length per row; when dropped frames were merged, each kept
    frame's group size as int16 (two bytes, like a float16 bias, but exact: the logit bias log(size) is taken from
    it at decode time), else None."""

    frames: torch.Tensor | HalfEntries | QuantizedEntries
    lengths: list[int]
    sizes: torch.Tensor | None
    dtype: torch.dtype
    dim: int
    #: the expanded frames of the current decode step: ``[B, F, d_model]`` and a ``[B, F]`` bias (or None)
    _expanded: tuple[torch.Tensor, torch.Tensor | None] | None = field(default=None, repr=False)

    @classmethod
    def build(
        cls, latent: torch.Tensor, keep: torch.Tensor, quant: QuantConfig | None = None, merge: str = "none"
    ) -> "LatentStore":
        """``latent [B, L, D]`` (the encoder output), ``keep [B, L]`` the frames each row keeps; the others are
        dropped, or with ``merge="mean"`` folded into the more similar kept neighbour."""
        batch, length, dim = latent.shape
        if keep.shape != (batch, length):
            raise ValueError(f"keep mask {tuple(keep.shape)} does not match the encoder output {(batch, length)}")
        if merge not in (None, "none", "mean"):
            raise ValueError(f"the encoder output can be merged as 'mean' only, got {merge!r}")
        lengths = keep.sum(-1).tolist()
        sizes = None
        if merge == "mean" and not bool(keep.all()):
            # One "head" per row: merging.merge_evicted groups along the frame axis exactly as for a K/V head.
            frames, _, log_size = merge_evicted(latent[:, None], latent[:, None], keep[:, None], "mean", torch.float32)
            frames = frames.to(latent.dtype)
            sizes = log_size.exp().round().to(torch.int16)
        else:
            frames = latent[keep].contiguous()
        if quant is not None and quant.bits < 16:
            stored = quantize_values(frames, quant)
        elif quant is not None and frames.element_size() > 2:
            stored = HalfEntries(frames.half(), frames.dtype)
        else:
            stored = frames
        return cls(stored, lengths, sizes, latent.dtype, dim)

    @property
    def bits(self) -> int:
        if isinstance(self.frames, torch.Tensor):
            return 8 * self.frames.element_size()
        return self.frames.bits

    @property
    def nbytes(self) -> int:
        return sum(self.row_bytes())

    def row_bytes(self) -> list[int]:
        """Bytes of each batch row's kept frames: codes or floats, scales and minimums, logit biases, its length."""
        if isinstance(self.frames, QuantizedEntries):
            stored = self.frames.segment_bytes(self.lengths)
        else:
            data = self.frames.data if isinstance(self.frames, HalfEntries) else self.frames
            stored = [n * self.dim * data.element_size() for n in self.lengths]
        per_frame = 0 if self.sizes is None else self.sizes.element_size()
        return [part + n * per_frame + LENGTH_BYTES for part, n in zip(stored, self.lengths)]

    def expand(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frames of every row as ``[B, F, D]`` floats (F: the longest row; shorter rows padded, their padding
        masked by a -inf bias) and the ``[B, F]`` logit bias, or None when no row needs one. Kept until `release`."""
        if self._expanded is None:
            flat = self.frames if isinstance(self.frames, torch.Tensor) else self.frames.dense(None)
            flat = flat.to(self.dtype)
            batch, longest = len(self.lengths), max(self.lengths)
            bias = None if self.sizes is None else self.sizes.float().log().to(self.dtype)
            if all(n == longest for n in self.lengths):
                dense = flat.view(batch, longest, self.dim)
                dense_bias = None if bias is None else bias.view(batch, longest)
            else:
                dense = flat.new_zeros(batch, longest, self.dim)
                dense_bias = flat.new_full((batch, longest), float("-inf"))
                start = 0
                for row, n in enumerate(self.lengths):
                    dense[row, :n] = flat[start : start + n]
                    dense_bias[row, :n] = 0.0 if bias is None else bias[start : start + n]
                    start += n
            self._expanded = (dense, dense_bias)
        return self._expanded

    def release(self) -> None:
        self._expanded = None


def latent_attention(
    frames: torch.Tensor, bias: torch.Tensor | None, query: torch.Tensor, projection: LatentProjection, scaling: float
) -> torch.Tensor:
    """Attention of ``query [B, H, T, head_dim]`` over the keys and values ``projection`` makes of ``frames [B, F,
    D]`` (``bias [B, F]`` added to every logit), computed without making them. Returns ``[B, T, H, head_dim]``
    like transformers' attention functions."""
    batch, heads, steps, head_dim = query.shape
    dtype = frames.dtype
    dim = frames.shape[-1]
    # Queries in the encoder's space, one matrix product per head over every row and step (einsum's own plan
    # took 1.2x the time at batch 1); then all heads' as the rows of one attention over the frames: [B, 1, H*T, D].
    per_head = query.to(dtype).transpose(0, 1).reshape(heads, batch * steps, head_dim)
    absorbed = torch.bmm(per_head, projection.key_weight.to(dtype))  # [H, B*T, D]
    absorbed = absorbed.view(heads, batch, steps, dim).transpose(0, 1).reshape(batch, 1, heads * steps, dim)
    mask = None if bias is None else bias.to(dtype)[:, None, None, :]
    # Keys and values are both the frames: one fused pass (scores, softmax, weighted sum) reads them once; at batch
    # 8 it took 0.68x the time of two matrix products and a softmax (one thread, Whisper base's shapes).
    mixed = torch.nn.functional.scaled_dot_product_attention(
        absorbed, frames[:, None], frames[:, None], attn_mask=mask, scale=scaling
    )  # sum_j p_j x_j per head and step
    mixed = mixed.view(batch, heads, steps, dim).transpose(0, 1).reshape(heads, batch * steps, dim)
    out = torch.bmm(mixed, projection.value_weight.to(dtype).transpose(1, 2))  # [H, B*T, head_dim]
    if projection.value_bias is not None:
        out = out + projection.value_bias.to(dtype)[:, None, :]
    return out.view(heads, batch, steps, head_dim).permute(1, 2, 0, 3).to(query.dtype)
