"""Kept cache entries stored as packed low-bit codes (`--kv-bits 8|4|2`), dequantized on the fly by the decode kernels.

Group-wise asymmetric (affine) quantization as KIVI does it: keys per channel (a few key channels carry outliers, so
each channel gets its own scale over a group of consecutive entries of one head), values per token (a scale per
group of channels of one entry). Each group stores a float16 scale and a float16 minimum; codes are
``round((x - minimum) / scale)`` in ``[0, 2**bits - 1]``, packed two 4-bit or four 2-bit codes per byte along the
channel axis. Nothing is kept as dequantized floats between steps: a decode step expands one layer's kept entries
into a temporary (`QuantizedEntries.dense`), freed when the layer's attention returns.

A layer that drops entries later (sliding window: `RaggedLayer.expire`) quantizes its keys per token too, so any
subset of entries stays exactly representable (`select`).

The primitives are written here rather than taken from torchao: on these CPU decode sizes torchao 0.18's
``dequantize_affine`` took 1.17 ms for 12,000 x 64 unpacked codes where the code below takes 0.45 ms on packed ones,
and importing it costs 1.7 s and prints load errors for its CUDA extensions (scripts/frontier/dequant_timing.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from audiokv_cli.errors import AudiokvError

BITS = (16, 8, 4, 2)  # 16: not quantized
# Entries per key scale (per channel) and channels per value scale (per token): KIVI's group sizes.
KEY_GROUP = 64
VALUE_GROUP = 64
SCALE_BYTES = 2 + 2  # float16 scale + float16 minimum per group


def check_bits(bits: int) -> int:
    if bits not in BITS:
        raise AudiokvError(f"--kv-bits must be one of {', '.join(map(str, BITS))}, got {bits}")
    return bits


@dataclass(frozen=True)
class QuantConfig:
    bits: int
    key_group: int = KEY_GROUP
    value_group: int = VALUE_GROUP

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of 16, 8, 4, 2, got {self.bits}")
        if self.key_group < 1 or self.value_group < 1:
            raise ValueError("quantization groups must hold at least one element")

    def value_group_for(self, head_dim: int) -> int:
        """Channels per token group: the configured size where it divides the head, else the whole head."""
        return self.value_group if head_dim % self.value_group == 0 else head_dim

    def entry_bytes(self, head_dim: int, per_token_keys: bool = False) -> float:
        """Bytes one kept entry costs (key and value codes and per-token scales), key channel scales not included."""
        codes = 2 * head_dim * self.bits / 8
        per_token = head_dim // self.value_group_for(head_dim)
        scales = per_token * SCALE_BYTES * (2 if per_token_keys else 1)
        return codes + scales


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., D]`` -> ``[..., D * bits / 8]`` bytes, the first code in the low bits."""
    if bits == 8:
        return codes
    per_byte = 8 // bits
    parts = codes.unflatten(-1, (-1, per_byte))
    packed = parts[..., 0].clone()
    for index in range(1, per_byte):
        packed |= parts[..., index] << (bits * index)
    return packed


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack`: uint8 codes ``[..., D]``."""
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * index)) & mask for index in range(8 // bits)]
    return torch.stack(parts, dim=-1).flatten(-2)


def _affine(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int):
    """Codes, float16 scale and float16 minimum for ``x`` given each element's group min/max (broadcast)."""
    levels = (1 << bits) - 1
    minimum = low.to(torch.float16)
    scale = ((high - minimum.float()) / levels).clamp(min=1e-5).to(torch.float16)
    codes = torch.round((x.float() - minimum.float()) / scale.float()).clamp_(0, levels).to(torch.uint8)
    return codes, scale, minimum


def quantize_per_token(x: torch.Tensor, bits: int, group: int):
    """``x [N, D]`` -> (packed codes ``[N, D*bits/8]``, scales ``[N, D/group]``, minimums ``[N, D/group]``)."""
    count, dim = x.shape
    grouped = x.float().view(count, dim // group, group)
    codes, scale, minimum = _affine(
        grouped, grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True), bits
    )
    return pack(codes.view(count, dim), bits), scale[..., 0], minimum[..., 0]


# Packed bytes unpacked per block of rows (`unpack_float`): small enough to stay in cache while each plane is written.
UNPACK_BLOCK_BYTES = 1 << 18


def unpack_float(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """float32 codes ``[N, dim]`` of packed rows (a decode step runs this on every kept entry): each code plane
    shifted and masked straight into its interleaved place in the output, in blocks of rows whose packed bytes stay
    in cache. One thread, best of 3, against one gather from a 256-entry table per byte: 4-bit 1,500 x 512 0.62
    against 1.22 ms, 12,000 x 512 4.9 against 10.8; 2-bit 28,800 x 64 1.06 against 1.50; 9,600 x 64 0.36 against
    0.53 (`.build`-only timing). Unblocked, the 12,000 x 512 2-bit case took over twice the gather's time."""
    count = packed.shape[0]
    if bits == 8:
        return packed.float()
    per_byte, mask = 8 // bits, (1 << bits) - 1
    out = torch.empty(count, packed.shape[1], per_byte, dtype=torch.float32, device=packed.device)
    block = max(1, UNPACK_BLOCK_BYTES // max(1, packed.shape[1]))
    for start in range(0, count, block):
        part, target = packed[start : start + block], out[start : start + block]
        for index in range(per_byte):
            target[..., index] = (part >> (bits * index)) & mask
    return out.view(count, dim)


def dequantize_per_token(packed, scale, minimum, bits: int, dtype: torch.dtype) -> torch.Tensor:
    count, groups = scale.shape
    dim = packed.shape[-1] * 8 // bits
    out = unpack_float(packed, bits, dim)
    grouped = out.view(count, groups, dim // groups)
    grouped.mul_(scale.float()[..., None]).add_(minimum.float()[..., None])
    return out if dtype == torch.float32 else out.to(dtype)


@dataclass
class QuantizedEntries:
    """Packed entries ``[N, D]`` of a compressed layer, in the segment order of its `SegmentLayout`.

    ``per_channel``: scales ``[G, D]`` over groups of ``group`` consecutive entries of one segment (groups never
    cross segments; a segment's last group may be shorter); otherwise scales ``[N, D / group]`` per entry.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    bits: int
    dim: int
    dtype: torch.dtype
    group: int
    per_channel: bool
    # per_channel only: first segment of each run -> index of its first scale group
    run_groups: dict[int, int]
    _entry_groups: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.dim)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.minimum))

    def entry_groups(self, layout) -> torch.Tensor:
        """``[N]`` the scale row of each entry (per-channel keys): built once per layer, so that `dense` scales every
        entry in one pass instead of one run at a time."""
        if self._entry_groups is None:
            parts = []
            for first, end, length, offset in layout.runs:
                if length:
                    groups = -(-length // self.group)
                    segment = torch.arange(end - first)[:, None] * groups
                    within = torch.arange(length)[None, :] // self.group
                    parts.append((self.run_groups[first] + segment + within).reshape(-1))
            rows = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
            self._entry_groups = rows.to(self.device)
        return self._entry_groups

    def dense(self, layout) -> torch.Tensor:
        """All entries dequantized ``[N, D]`` (the padded and varlen kernels read a plain tensor)."""
        if not self.per_channel:
            return dequantize_per_token(self.codes, self.scale, self.minimum, self.bits, self.dtype)
        out = unpack_float(self.codes, self.bits, self.dim)
        rows = self.entry_groups(layout)
        out.mul_(self.scale.float().index_select(0, rows)).add_(self.minimum.float().index_select(0, rows))
        return out if self.dtype == torch.float32 else out.to(self.dtype)

    def select(self, visible: torch.Tensor) -> "QuantizedEntries":
        """The entries where ``visible`` is true (per-token scales only: each entry is self-contained)."""
        if self.per_channel:
            raise RuntimeError("per-channel quantized entries cannot drop single entries")
        return QuantizedEntries(
            self.codes[visible].contiguous(), self.scale[visible].contiguous(), self.minimum[visible].contiguous(),
            self.bits, self.dim, self.dtype, self.group, False, {},
        )

    def segment_bytes(self, lengths: list[int]) -> list[int]:
        """Bytes attributable to each segment (codes, scales, minimums)."""
        code_bytes = self.codes.shape[-1] * self.codes.element_size()
        if not self.per_channel:
            per_entry = code_bytes + self.scale.shape[-1] * SCALE_BYTES
            return [n * per_entry for n in lengths]
        group_bytes = self.dim * SCALE_BYTES
        return [n * code_bytes + -(-n // self.group) * group_bytes for n in lengths]


@dataclass
class HalfEntries:
    """Kept entries of a float32 model stored as float16 (``--kv-bits 16``), widened on the fly in each decode call."""

    data: torch.Tensor
    dtype: torch.dtype
    bits: int = 16

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def dense(self, layout) -> torch.Tensor:
        return self.data.to(self.dtype)

    def select(self, visible: torch.Tensor) -> "HalfEntries":
        return HalfEntries(self.data[visible].contiguous(), self.dtype)

    def segment_bytes(self, lengths: list[int]) -> list[int]:
        return [n * self.data.shape[-1] * self.data.element_size() for n in lengths]


def store(keys: torch.Tensor, values: torch.Tensor, layout, config: QuantConfig, per_token_keys: bool):
    """Kept keys and values ``[N, D]`` in the form ``config`` asks for (plain tensors where nothing changes)."""
    if config.bits == 16:
        if keys.element_size() <= 2:
            return keys, values
        return HalfEntries(keys.half(), keys.dtype), HalfEntries(values.half(), values.dtype)
    stored_keys = quantize_values(keys, config) if per_token_keys else quantize_keys(keys, layout, config)
    return stored_keys, quantize_values(values, config)


def quantize_values(values: torch.Tensor, config: QuantConfig) -> QuantizedEntries:
    """Values (or a sliding layer's keys) per token: ``[N, D]`` packed entries with per-entry scales."""
    count, dim = values.shape
    group = config.value_group_for(dim)
    codes, scale, minimum = quantize_per_token(values, config.bits, group)
    return QuantizedEntries(codes, scale, minimum, config.bits, dim, values.dtype, group, False, {})


def quantize_keys(keys: torch.Tensor, layout, config: QuantConfig) -> QuantizedEntries:
    """Keys per channel: within each segment, groups of ``config.key_group`` consecutive entries share one scale
    and minimum per channel."""
    count, dim = keys.shape
    group = config.key_group
    code_parts, scale_parts, minimum_parts, run_groups = [], [], [], {}
    next_group = 0
    for first, end, length, offset in layout.runs:
        run_groups[first] = next_group
        if not length:
            continue
        segments = end - first
        x = keys[offset : offset + segments * length].float().view(segments, length, dim)
        groups = -(-length // group)
        low = torch.empty(segments, groups, dim, device=keys.device)
        high = torch.empty_like(low)
        whole = length // group
        if whole:
            body = x[:, : whole * group].view(segments, whole, group, dim)
            low[:, :whole], high[:, :whole] = body.amin(2), body.amax(2)
        if length % group:
            rest = x[:, whole * group :]
            low[:, whole], high[:, whole] = rest.amin(1), rest.amax(1)
        # Each entry's group: position // group within its segment.
        index = torch.arange(length, device=keys.device) // group
        codes, scale, minimum = _affine(x, low[:, index], high[:, index], config.bits)
        code_parts.append(pack(codes.view(-1, dim), config.bits))
        # The rounded scale of each group is the same for all its entries: take one entry per group.
        firsts = torch.arange(groups, device=keys.device) * group
        scale_parts.append(scale[:, firsts].reshape(-1, dim))
        minimum_parts.append(minimum[:, firsts].reshape(-1, dim))
        next_group += segments * groups
    empty_codes = keys.new_zeros(0, dim * config.bits // 8, dtype=torch.uint8)
    empty_scales = keys.new_zeros(0, dim, dtype=torch.float16)
    return QuantizedEntries(
        torch.cat(code_parts) if code_parts else empty_codes,
        torch.cat(scale_parts) if scale_parts else empty_scales,
        torch.cat(minimum_parts) if minimum_parts else empty_scales,
        config.bits, dim, keys.dtype, group, True, run_groups,
    )

