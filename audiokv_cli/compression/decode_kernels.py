"""Attention of new queries over a compressed layer, where every KV head keeps its own number of prompt entries.

A compressed layer holds its kept prompt entries packed, ``[N, head_dim]``, one segment per (batch row, KV head) in
row-major order, plus a dense ``[B, Hkv, capacity, head_dim]`` tail of tokens generated since. `SegmentLayout` is built
once at compress time (the only host sync): segment lengths on the host, consecutive segments of equal length
grouped into runs (one batched call each), and cumulative offsets on the device for varlen kernels. Decode then
never syncs, never copies the cache to float32 (products in the cache's dtype, softmax and sums in float32) and lets
each query head read only its own KV head's segment.

Backends (``--decode-kernel``; `AUDIOKV_DECODE_KERNEL` carries the choice into worker processes):

- ``matmul``: per run, one batched matmul for scores and one for values; one softmax over all segments at once.
- ``sdpa``: per run, PyTorch's CPU flash-attention kernel, merged with the tail by log-sum-exp (CPU only).
- ``varlen``: PyTorch's own varlen flash attention (``torch.nn.attention.varlen``; CUDA, half precision).
- ``flash-attn``: ``flash_attn_varlen_func`` from the optional flash-attn package (CUDA, half precision).
- ``padded``: kept entries gathered into a padded ``[segments, longest, head_dim]`` copy every step, then SDPA with a
  mask: the fallback that runs anywhere but copies what it reads.

``auto`` picks varlen, else flash-attn, else padded on CUDA; on CPU the one of sdpa and matmul that runs faster,
timed once per process on the first problem of each shape (`cpu_choice`).

A layer whose tail stays empty (cross-attention over a compressed encoder memory) is attended without a tail and
without a causal mask.

Kept entries may be packed low-bit codes (`quantization.QuantizedEntries`): every backend reads them expanded for the
whole layer at once (`DecodeProblem.expanded`, `dense_keys` / `dense_values`), so all of them give what attending over
the dequantized entries gives. An entry may also carry a
logit bias (``bias [N]``, added to its score before the softmax: a merged entry's log-weight); every backend adds it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from audiokv_cli.compression.quantization import HalfEntries, QuantizedEntries
from audiokv_cli.errors import AudiokvError

KERNEL_ENV = "AUDIOKV_DECODE_KERNEL"
KERNEL_NAMES = ("auto", "matmul", "sdpa", "varlen", "flash-attn", "padded")
HALF = (torch.float16, torch.bfloat16)


@dataclass
class SegmentLayout:
    """Where each (batch row, KV head) segment sits in the packed cache; built once per compressed layer."""

    lengths: tuple[int, ...]
    # (first segment, end segment, length, offset of the first entry): consecutive segments of equal length.
    runs: tuple[tuple[int, int, int, int], ...]
    max_length: int
    total: int
    cu_seqlens: torch.Tensor  # int32 [segments + 1] on the cache's device, for varlen kernels
    _padded: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor) -> "SegmentLayout":
        host = [int(n) for n in lengths.reshape(-1).tolist()]
        runs, offset, first = [], 0, 0
        for index in range(1, len(host) + 1):
            if index == len(host) or host[index] != host[first]:
                runs.append((first, index, host[first], offset))
                offset += (index - first) * host[first]
                first = index
        starts = [0]
        for n in host:
            starts.append(starts[-1] + n)
        cu = torch.tensor(starts, dtype=torch.int32, device=lengths.device)
        return cls(tuple(host), tuple(runs), max(host, default=0), starts[-1], cu)

    @property
    def segments(self) -> int:
        return len(self.lengths)

    def padded_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[S, longest]`` indices into the packed cache and the mask of real (not padding) entries."""
        if self._padded is None:
            device = self.cu_seqlens.device
            steps = torch.arange(self.max_length, device=device)
            lengths = torch.tensor(self.lengths, device=device)
            valid = steps[None, :] < lengths[:, None]
            index = (self.cu_seqlens[:-1].long()[:, None] + steps[None, :]).masked_fill(~valid, 0)
            self._padded = (index, valid)
        return self._padded


@dataclass
class DecodeProblem:
    """One call's tensors, per segment: queries ``[S, W, D]`` (W = group x q_len) and tail views ``[S, T, D]``."""

    layout: SegmentLayout
    keys: "torch.Tensor | QuantizedEntries | HalfEntries"
    values: "torch.Tensor | QuantizedEntries | HalfEntries"
    queries: torch.Tensor
    tail_keys: torch.Tensor | None
    tail_values: torch.Tensor | None
    q_len: int
    scaling: float
    bias: torch.Tensor | None = None

    @property
    def tail_length(self) -> int:
        return 0 if self.tail_keys is None else self.tail_keys.shape[1]

    def tail_mask(self) -> torch.Tensor | None:
        """True where a query may not see a tail entry: the last q_len tail entries are the queries themselves."""
        if self.q_len == 1 or self.tail_length == 0:
            return None
        group = self.queries.shape[1] // self.q_len
        device = self.queries.device
        position = torch.arange(self.q_len, device=device).repeat(group) + self.tail_length - self.q_len
        return torch.arange(self.tail_length, device=device)[None, :] > position[:, None]  # [W, T]

    def _run(self, entries: torch.Tensor, first: int, end: int, length: int, offset: int) -> torch.Tensor:
        count = (end - first) * length
        return entries[offset : offset + count].view(end - first, length, entries.shape[-1])

    def run_keys(self, first: int, end: int, length: int, offset: int) -> torch.Tensor:
        """``[segments, length, D]`` keys of one run, a view (plain entries: stored ones are `expanded` first)."""
        return self._run(self.keys, first, end, length, offset)

    def run_values(self, first: int, end: int, length: int, offset: int) -> torch.Tensor:
        return self._run(self.values, first, end, length, offset)

    def run_views(self, first: int, end: int, length: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.run_keys(first, end, length, offset), self.run_values(first, end, length, offset)

    def run_bias(self, first: int, end: int, length: int, offset: int) -> torch.Tensor | None:
        """``[segments, 1, length]`` float32 logit bias of one run's entries, or None."""
        if self.bias is None:
            return None
        return self.bias[offset : offset + (end - first) * length].float().view(end - first, 1, length)

    def dense_keys(self) -> torch.Tensor:
        return self.keys if isinstance(self.keys, torch.Tensor) else self.keys.dense(self.layout)

    def dense_values(self) -> torch.Tensor:
        return self.values if isinstance(self.values, torch.Tensor) else self.values.dense(self.layout)

    def expanded(self) -> "DecodeProblem":
        """This problem with stored entries (packed codes, float16) expanded to the cache's dtype for the whole layer
        at once: a temporary of the layer's kept entries that lives for this call. Per-head budgets make many runs
        (8 rows x 8 heads: up to 64 per layer), and expanding each on its own costs a dozen calls per run."""
        if isinstance(self.keys, torch.Tensor) and isinstance(self.values, torch.Tensor):
            return self
        return dataclasses.replace(self, keys=self.dense_keys(), values=self.dense_values())

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.keys.dtype


def _tail_part(problem: DecodeProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and log-sum-exp ``[S, W]`` of the queries over the tail alone (float32)."""
    segments, width, dim = problem.queries.shape
    if problem.queries.device.type == "cpu" and problem.q_len > 1 and problem.tail_length == problem.q_len:
        # A prefill chunk over itself: plain causal attention, tiled by the CPU flash kernel (no [W, T] scores).
        group = width // problem.q_len
        queries = problem.queries.view(segments, group, problem.q_len, dim)
        keys = problem.tail_keys[:, None].expand(segments, group, problem.q_len, dim)
        values = problem.tail_values[:, None].expand(segments, group, problem.q_len, dim)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            queries, keys, values, 0.0, True, scale=problem.scaling
        )
        return out.reshape(segments, width, dim).float(), lse.reshape(segments, width)
    scores = torch.bmm(problem.queries, problem.tail_keys.transpose(1, 2)).float() * problem.scaling
    mask = problem.tail_mask()
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).to(problem.tail_values.dtype)
    return torch.bmm(probs, problem.tail_values).float(), lse


def _merge(kept: tuple[torch.Tensor, torch.Tensor], problem: DecodeProblem) -> torch.Tensor:
    """Combine the kept-entry softmax with the tail's through their log-sum-exps (exact, like split-KV decoding)."""
    out, lse = kept
    if problem.tail_length == 0:
        return out
    tail_out, tail_lse = _tail_part(problem)
    top = torch.maximum(lse, tail_lse)
    weight, tail_weight = torch.exp(lse - top), torch.exp(tail_lse - top)
    return (out * weight[..., None] + tail_out * tail_weight[..., None]) / (weight + tail_weight)[..., None]


def matmul_kernel(problem: DecodeProblem) -> torch.Tensor:
    """Batched matmuls per run of equal-length segments; one float32 softmax over kept and tail scores together.

    Products are written straight into their slice of the score and output buffers where the dtypes allow it
    (float32): at decode sizes the count of torch calls, not arithmetic, is what a step costs on CPU.
    """
    problem = problem.expanded()
    layout = problem.layout
    queries = problem.queries * problem.scaling  # scale the few queries, not the many scores
    segments, width, dim = queries.shape
    longest, tail = layout.max_length, problem.tail_length
    direct = queries.dtype == torch.float32
    whole = len(layout.runs) == 1 and layout.runs[0][2] == longest
    if whole:  # uniform budgets: the packed cache is a [S, L, D] view, no score buffer needed
        keys = problem.run_keys(*layout.runs[0])
        scores = torch.bmm(queries, keys.transpose(1, 2)).float()
        bias = problem.run_bias(*layout.runs[0])
        if bias is not None:
            scores += bias
        if tail:
            scores = torch.cat([scores, torch.bmm(queries, problem.tail_keys.transpose(1, 2)).float()], dim=-1)
    else:
        scores = torch.full((segments, width, longest + tail), float("-inf"), device=queries.device)
        for first, end, length, offset in layout.runs:
            if length:
                keys = problem.run_keys(first, end, length, offset)
                if direct:
                    torch.bmm(queries[first:end], keys.transpose(1, 2), out=scores[first:end, :, :length])
                else:
                    scores[first:end, :, :length] = torch.bmm(queries[first:end], keys.transpose(1, 2))
                bias = problem.run_bias(first, end, length, offset)
                if bias is not None:
                    scores[first:end, :, :length] += bias
        if tail:
            if direct:
                torch.bmm(queries, problem.tail_keys.transpose(1, 2), out=scores[:, :, longest:])
            else:
                scores[:, :, longest:] = torch.bmm(queries, problem.tail_keys.transpose(1, 2))
    mask = problem.tail_mask()
    if mask is not None:
        scores[:, :, longest:].masked_fill_(mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(problem.cache_dtype)
    if whole:
        out = torch.bmm(probs[:, :, :longest], problem.run_values(*layout.runs[0]))
    else:
        out = queries.new_zeros(segments, width, dim, dtype=problem.cache_dtype if direct else torch.float32)
        for first, end, length, offset in layout.runs:
            if length:
                values = problem.run_values(first, end, length, offset)
                if direct:
                    torch.bmm(probs[first:end, :, :length], values, out=out[first:end])
                else:
                    out[first:end] = torch.bmm(probs[first:end, :, :length], values)
    if tail and direct:
        return out.baddbmm_(probs[:, :, longest:], problem.tail_values)
    out = out.float()
    if tail:
        out += torch.bmm(probs[:, :, longest:], problem.tail_values).float()
    return out


def sdpa_kernel(problem: DecodeProblem) -> torch.Tensor:
    """PyTorch's CPU flash kernel per run (it returns the log-sum-exp), merged with the tail."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    problem = problem.expanded()
    queries, layout = problem.queries, problem.layout
    segments, width, dim = queries.shape
    out = queries.new_zeros(segments, width, dim, dtype=torch.float32)
    lse = queries.new_full((segments, width), float("-inf"), dtype=torch.float32)
    for first, end, length, offset in layout.runs:
        if length:
            keys, values = problem.run_views(first, end, length, offset)
            bias = problem.run_bias(first, end, length, offset)
            if bias is not None:
                bias = bias[:, None].to(queries.dtype)  # [S, 1, 1, L]: broadcast over the query rows
            run_out, run_lse = flash(
                queries[first:end, None], keys[:, None], values[:, None], 0.0, False, attn_mask=bias,
                scale=problem.scaling,
            )
            out[first:end] = run_out[:, 0]
            lse[first:end] = run_lse[:, 0]
    return _merge((out, lse), problem)


def padded_kernel(problem: DecodeProblem) -> torch.Tensor:
    """Kept entries gathered into a padded copy next to the tail, then one masked SDPA call for all segments."""
    index, valid = problem.layout.padded_index()
    keys, values = problem.dense_keys()[index], problem.dense_values()[index]  # [S, L, D]
    mask = valid[:, None, :].expand(-1, problem.queries.shape[1], -1)
    if problem.bias is not None:
        # A float mask: each entry's bias, -inf on the padding.
        bias = problem.bias.float()[index].masked_fill(~valid, float("-inf"))
        mask = bias[:, None, :].expand(-1, problem.queries.shape[1], -1)
    if problem.tail_length:
        keys = torch.cat([keys, problem.tail_keys], dim=1)
        values = torch.cat([values, problem.tail_values], dim=1)
        tail_mask = problem.tail_mask()
        tail_visible = torch.ones_like(mask[:, :, :1], dtype=torch.bool).expand(-1, -1, problem.tail_length)
        if tail_mask is not None:
            tail_visible = tail_visible & ~tail_mask[None]
        if mask.dtype != torch.bool:
            tail_visible = torch.zeros_like(tail_visible, dtype=mask.dtype).masked_fill(~tail_visible, float("-inf"))
        mask = torch.cat([mask, tail_visible], dim=-1)
    if mask.dtype != torch.bool:
        mask = mask.to(problem.queries.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(
        problem.queries[:, None], keys[:, None], values[:, None], attn_mask=mask[:, None], scale=problem.scaling
    )
    return out[:, 0].float()


def _varlen_inputs(problem: DecodeProblem):
    segments, width, dim = problem.queries.shape
    cu_q = torch.arange(0, (segments + 1) * width, width, dtype=torch.int32, device=problem.queries.device)
    return (
        problem.queries.reshape(segments * width, 1, dim), problem.dense_keys()[:, None],
        problem.dense_values()[:, None], cu_q,
    )


def _varlen_result(problem: DecodeProblem, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """A varlen kernel's output and log-sum-exp back in ``[S, W]`` form, merged with the tail."""
    segments, width, dim = problem.queries.shape
    lse = lse.reshape(segments, width).float()
    if min(problem.layout.lengths, default=1) == 0:
        # A segment that kept nothing has no softmax: weight zero in the merge, whatever the kernel wrote.
        empty = torch.tensor([n == 0 for n in problem.layout.lengths], device=lse.device)
        lse = lse.masked_fill(empty[:, None], float("-inf"))
    return _merge((out.reshape(segments, width, dim).float(), lse), problem)


def varlen_kernel(problem: DecodeProblem) -> torch.Tensor:
    """torch.nn.attention.varlen: every segment is one sequence of one head, queries included (non-causal)."""
    if problem.bias is not None:
        return padded_kernel(problem)  # varlen_attn takes no per-entry bias
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    segments, width, dim = problem.queries.shape
    queries, keys, values, cu_q = _varlen_inputs(problem)
    out, lse = varlen_attn(
        queries, keys, values, cu_q, problem.layout.cu_seqlens, width, problem.layout.max_length,
        return_aux=AuxRequest(lse=True), scale=problem.scaling,
    )
    return _varlen_result(problem, out, lse)


def flash_attn_kernel(problem: DecodeProblem) -> torch.Tensor:
    """flash_attn_varlen_func, the kernel AdaKV and KVCache-Factory decode with."""
    if problem.bias is not None:
        return padded_kernel(problem)  # flash_attn_varlen_func takes no per-entry bias
    from flash_attn import flash_attn_varlen_func

    segments, width, dim = problem.queries.shape
    queries, keys, values, cu_q = _varlen_inputs(problem)
    out, lse, _ = flash_attn_varlen_func(
        queries, keys, values, cu_q, problem.layout.cu_seqlens, width, problem.layout.max_length,
        softmax_scale=problem.scaling, causal=False, return_attn_probs=True,
    )
    return _varlen_result(problem, out, lse)


KERNELS: dict[str, Callable[[DecodeProblem], torch.Tensor]] = {
    "matmul": matmul_kernel,
    "sdpa": sdpa_kernel,
    "varlen": varlen_kernel,
    "flash-attn": flash_attn_kernel,
    "padded": padded_kernel,
}


def _has_torch_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import AuxRequest, varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _has_flash_attn() -> bool:
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except ImportError:
        return False
    return True


def available_kernels(device: torch.device | str, dtype: torch.dtype) -> list[str]:
    """Backends that can run here for this cache dtype."""
    device = torch.device(device)
    names = ["matmul", "padded"]
    if device.type == "cpu":
        names.insert(1, "sdpa")
    if device.type == "cuda" and dtype in HALF:
        if _has_flash_attn():
            names.insert(0, "flash-attn")
        if _has_torch_varlen():
            names.insert(0, "varlen")
    return names


# CPU choice per problem shape, measured once per process: {shape key: backend name}.
_CPU_CHOICES: dict[tuple, str] = {}
CPU_CANDIDATES = ("matmul", "sdpa")
# Above this many float32 scores per call the matmul backend is not a candidate: the flash kernel tiles them.
MATMUL_SCORES_LIMIT = 1 << 22


def _shape_key(problem: DecodeProblem) -> tuple:
    layout = problem.layout
    # Same segment count, query width, head size and dtype, one run or many, lengths within a factor of two.
    quantized = getattr(problem.keys, "bits", None)
    return (
        *problem.queries.shape, problem.cache_dtype, len(layout.runs) == 1, layout.max_length.bit_length(), quantized,
        problem.bias is not None,
    )


def cpu_choice(problem: DecodeProblem) -> str:
    """sdpa or matmul, whichever runs this problem faster here; timed on the first problem of each shape.

    Neither wins everywhere (`audiokv bench --kernel`, docs/performance.md): the flash kernel's per-call setup
    dominates short segments, its fused softmax can win on long ones; both give the same values to rounding.
    """
    if problem.queries.shape[0] * problem.queries.shape[1] * (problem.layout.max_length + problem.tail_length) > (
        MATMUL_SCORES_LIMIT
    ):
        return "sdpa"  # long multi-token queries (chunked prefill): matmul's score buffer would not fit in cache
    key = _shape_key(problem)
    if key not in _CPU_CHOICES:
        timings = {}
        for name in CPU_CANDIDATES:
            KERNELS[name](problem)  # warm-up
            start = time.perf_counter()
            for _ in range(3):
                KERNELS[name](problem)
            timings[name] = time.perf_counter() - start
        _CPU_CHOICES[key] = min(timings, key=timings.get)
    return _CPU_CHOICES[key]


def requested_kernel() -> str:
    name = os.environ.get(KERNEL_ENV, "auto") or "auto"
    if name not in KERNEL_NAMES:
        raise AudiokvError(f"unknown decode kernel {name!r}: use {', '.join(KERNEL_NAMES)}")
    return name


def select_kernel(name: str) -> None:
    """Force a backend for this process and the worker processes it starts (``auto`` restores the default)."""
    if name not in KERNEL_NAMES:
        raise AudiokvError(f"unknown decode kernel {name!r}: use {', '.join(KERNEL_NAMES)}")
    os.environ[KERNEL_ENV] = name


def check_kernel(name: str, device: torch.device | str, dtype: torch.dtype) -> None:
    """One line, before any work, when a forced backend cannot run on this device and dtype."""
    if name not in KERNEL_NAMES:
        raise AudiokvError(f"unknown decode kernel {name!r}: use {', '.join(KERNEL_NAMES)}")
    if name != "auto" and name not in available_kernels(device, dtype):
        dtype_name = str(dtype).removeprefix("torch.")
        raise AudiokvError(
            f"decode kernel {name!r} is not available on {torch.device(device).type} with {dtype_name} "
            f"(available: {', '.join(available_kernels(device, dtype))})"
        )


def use_kernel_option(name: str, device: torch.device | str, dtype: torch.dtype) -> None:
    """What ``--decode-kernel NAME`` does once the model is loaded: check it can run, then select it."""
    check_kernel(name, device, dtype)
    select_kernel(name)


def resolve_kernel(name: str, problem: DecodeProblem) -> str:
    if name != "auto":
        return name
    device, dtype = problem.queries.device, problem.cache_dtype
    if device.type == "cpu":
        return cpu_choice(problem)
    if problem.bias is not None:
        return "padded"  # the varlen kernels take no per-entry bias
    return available_kernels(device, dtype)[0] if dtype in HALF else "padded"


def decode_problem(
    layout: SegmentLayout,
    keys: torch.Tensor,
    values: torch.Tensor,
    tail_keys: torch.Tensor | None,
    tail_values: torch.Tensor | None,
    query: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> DecodeProblem:
    """``query`` ``[B, Hq, q_len, D]`` over packed kept entries ``[N, D]`` (plain or `QuantizedEntries`), their
    optional logit bias ``[N]`` and an optional tail ``[S, T, D]``."""
    batch, query_heads, q_len, dim = query.shape
    width = query_heads * batch // layout.segments * q_len
    # Query head h reads KV head h // group: [B, Hq, q, D] is already [B, Hkv, group, q, D] in memory order.
    queries = query.to(keys.dtype).reshape(layout.segments, width, dim)
    if tail_keys is not None and not tail_keys.shape[1]:
        tail_keys = tail_values = None
    return DecodeProblem(
        layout, keys, values, queries, tail_keys, tail_values, q_len=q_len, scaling=scaling, bias=bias
    )


def decode_attention(problem: DecodeProblem, query: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
    """Run ``problem`` on the forced or automatic backend; ``[B, q_len, Hq, D]`` in the query's dtype, like
    transformers' attention functions."""
    batch, query_heads, q_len, dim = query.shape
    out = KERNELS[resolve_kernel(kernel or requested_kernel(), problem)](problem)
    return out.reshape(batch, query_heads, q_len, dim).transpose(1, 2).to(query.dtype)
