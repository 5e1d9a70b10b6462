"""Decode attention alone, on random tensors of a real decoder's geometry: ragged kept patterns against dense SDPA.

One layer is built per method: random prompt keys and values of ``prompt_tokens`` positions, the method's own keep
mask from its scorer, smoother and budget allocator at the given retention (`audiokv` gets a seeded random head
profile), a tail of generated tokens, then one decode step's attention is timed for every backend that runs here.
Dense SDPA over the whole prompt (``enable_gqa``, the fastest dense path) is timed in the same run, interleaved, so
the ratios hold on a shared machine. A model's decode step runs this once per layer, so ``ms_per_token`` is the
timed layer times the layer count (kept counts of the middle layer stand for every layer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from audiokv_cli.compression.budgets import BudgetContext
from audiokv_cli.compression.cache import RaggedLayer, layer_problem, ragged_decode_attention
from audiokv_cli.compression.decode_kernels import available_kernels, resolve_kernel
from audiokv_cli.errors import AudiokvError
from audiokv_cli.models.base import AttentionGeometry

# Text-decoder attention of the models audiokv serves (config.json of each checkpoint).
GEOMETRIES: dict[str, AttentionGeometry] = {
    # layers, query heads, KV heads, head size, hidden size
    "qwen2-audio-7b": AttentionGeometry(32, 32, 32, 128, 4096),
    "qwen2.5-omni-7b": AttentionGeometry(28, 28, 4, 128, 3584),
    "qwen2.5-omni-3b": AttentionGeometry(36, 16, 2, 128, 2048),
    "qwen3-omni-30b": AttentionGeometry(48, 32, 4, 128, 2048),
    "tiny": AttentionGeometry(4, 8, 2, 32, 256),
}

# Generated tokens already in the cache when the timed step runs (a transcript under way).
TAIL_TOKENS = 32


def geometry_named(name: str) -> AttentionGeometry:
    if name not in GEOMETRIES:
        raise AudiokvError(f"unknown geometry {name!r}; choose one of: {', '.join(GEOMETRIES)}")
    return GEOMETRIES[name]


@dataclass
class KernelRow:
    method: str
    retention: float
    kernel: str
    geometry: str
    batch: int
    prompt_tokens: int
    kv_bytes_full: int
    kv_bytes_kept: int
    ms_per_layer: float
    ms_per_token: float
    vs_dense: float
    tokens_per_second: float
    seconds_prefill: float
    peak_prefill_cache_bytes: int
    dtype: str

    @property
    def kept_ratio(self) -> float:
        return self.kv_bytes_kept / self.kv_bytes_full


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mean_seconds(call, device: torch.device, iterations: int) -> float:
    """Mean seconds per call over ``iterations`` calls after one warm-up call."""
    call()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        call()
    _synchronize(device)
    return (time.perf_counter() - start) / iterations


def synthetic_head_scores(geometry: AttentionGeometry, seed: int = 0) -> torch.Tensor:
    """A stand-in head profile: a few strongly audio-following heads among many weak ones, as real profiles show."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(geometry.num_layers, geometry.num_query_heads, generator=generator) ** 3


def _context(policy, geometry: AttentionGeometry, prompt_tokens: int) -> BudgetContext:
    return BudgetContext(
        retention=policy.retention,
        prompt_len=prompt_tokens,
        window=policy.window,
        num_layers=geometry.num_layers,
        num_kv_heads=geometry.num_kv_heads,
        num_query_heads=geometry.num_query_heads,
        scope=policy.scope,
        # Audio fills the prompt between a short instruction and the answer cue.
        audio_spans=((16, prompt_tokens - 16),),
    )


def typical_layer(policy, geometry: AttentionGeometry, prompt_tokens: int) -> int:
    """The layer whose budget is closest to the mean over layers (pyramid and profile budgets vary with depth)."""
    context = _context(policy, geometry, prompt_tokens)
    try:
        totals = [float(policy.budget.allocate(i, None, context).sum()) for i in range(geometry.num_layers)]
    except AudiokvError:  # the allocator needs scores: its budgets do not depend on depth
        return geometry.num_layers // 2
    mean = sum(totals) / len(totals)
    return min(range(len(totals)), key=lambda i: abs(totals[i] - mean))


def keep_pattern(policy, geometry, layer_idx, keys, prompt_tokens, device, scaling) -> tuple[torch.Tensor, float]:
    """The method's keep mask for random keys (window queries random too) and the seconds it took to compute."""
    batch = keys.shape[0]
    shape = (batch, geometry.num_query_heads, policy.window, geometry.head_dim)
    queries = torch.randn(shape, device=device, dtype=keys.dtype)
    context = _context(policy, geometry, prompt_tokens)
    _synchronize(device)
    start = time.perf_counter()
    keep = policy.keep_mask(layer_idx, queries, keys, scaling, context)
    _synchronize(device)
    return keep, time.perf_counter() - start


def bench_kernels(
    geometry_name: str,
    policies: list,
    prompt_tokens: int,
    device: torch.device,
    dtype: torch.dtype,
    batch: int = 1,
    repeats: int = 3,
    iterations: int = 10,
    kernels: list[str] | None = None,
) -> list[KernelRow]:
    """Rows for dense SDPA (method ``full``) and every (evicting method, backend) pair, timed interleaved."""
    geometry = geometry_named(geometry_name)
    torch.manual_seed(0)
    kv_heads, dim = geometry.num_kv_heads, geometry.head_dim
    scaling = dim**-0.5
    shape = (batch, kv_heads, prompt_tokens, dim)
    keys = torch.randn(shape, device=device, dtype=dtype)
    values = torch.randn(shape, device=device, dtype=dtype)
    tail_keys = torch.randn(batch, kv_heads, TAIL_TOKENS, dim, device=device, dtype=dtype)
    tail_values = torch.randn(batch, kv_heads, TAIL_TOKENS, dim, device=device, dtype=dtype)
    query = torch.randn(batch, geometry.num_query_heads, 1, dim, device=device, dtype=dtype)
    dense_keys = torch.cat([keys, tail_keys], dim=2)
    dense_values = torch.cat([values, tail_values], dim=2)
    element = keys.element_size()
    layer_full = 2 * batch * kv_heads * prompt_tokens * dim * element

    # The fastest dense decode: a KV head's query group read as that head's query rows (no repeated keys).
    grouped_query = query.view(batch, kv_heads, geometry.group_size, dim)

    def dense():
        return torch.nn.functional.scaled_dot_product_attention(grouped_query, dense_keys, dense_values, scale=scaling)

    cases = []  # (method, retention, kernel, call, kept bytes of the layer, selection seconds)
    cases.append(("full", 1.0, "sdpa-dense", dense, layer_full, 0.0))
    names = kernels or available_kernels(device, dtype)
    for policy in policies:
        if not policy.evicts:
            continue
        layer_idx = typical_layer(policy, geometry, prompt_tokens)
        keep, seconds_select = keep_pattern(policy, geometry, layer_idx, keys, prompt_tokens, device, scaling)
        layer = RaggedLayer()
        layer.update(keys, values)
        layer.compress(keep)
        layer.update(tail_keys, tail_values)
        kept = 2 * int(keep.sum()) * dim * element
        auto = resolve_kernel("auto", layer_problem(layer, query, scaling))
        for name in names:
            label = f"{name} (auto)" if name == auto else name

            def call(layer=layer, name=name):
                return ragged_decode_attention(layer, query, scaling, kernel=name)

            cases.append((policy.name, policy.retention, label, call, kept, seconds_select))
    del keys, values

    best = [float("inf")] * len(cases)
    with torch.no_grad():
        for _ in range(repeats):
            for index, case in enumerate(cases):
                best[index] = min(best[index], mean_seconds(case[3], device, iterations))
    dense_seconds = best[0]
    rows = []
    layers = geometry.num_layers
    for (method, retention, kernel, _, kept, select), seconds in zip(cases, best):
        ms_token = 1000 * seconds * layers
        rows.append(
            KernelRow(
                method=method,
                retention=retention,
                kernel=kernel,
                geometry=geometry_name,
                batch=batch,
                prompt_tokens=prompt_tokens,
                kv_bytes_full=layer_full * layers,
                kv_bytes_kept=kept * layers,
                ms_per_layer=1000 * seconds,
                ms_per_token=ms_token,
                vs_dense=seconds / dense_seconds,
                tokens_per_second=batch * 1000 / ms_token,
                seconds_prefill=select * layers,
                # Prefill holds the compressed layers so far plus the one being compressed at full size.
                peak_prefill_cache_bytes=kept * (layers - 1) + layer_full if method != "full" else layer_full * layers,
                dtype=str(dtype).removeprefix("torch."),
            )
        )
    return rows
