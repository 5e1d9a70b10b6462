"""Decode attention over a real compressed Whisper cache, per backend, against dense SDPA over the full cache.

Runs `audiokv bench` once with the given options, keeps the decode problems of the first decode step (one per
cache layer, at the batch size asked for), then times every CPU backend on them and dense SDPA on a full cache of
the same shape (1,500 frames per head), one thread. Prints milliseconds for all layers together.

    python scripts/frontier/decode_timing.py --batch 8 -- --model whisper-base --methods audiokv --kv-budget 0.05
"""

from __future__ import annotations

import argparse
import sys

import torch

from audiokv_cli.bench.kernels import mean_seconds
from audiokv_cli.compression import decode_kernels

CPU = torch.device("cpu")


def capture(bench_args: list[str], segments: int) -> list:
    """The first decode step's problems (one per layer) of a bench run whose batch has ``segments`` segments."""
    problems: list = []
    original = dict(decode_kernels.KERNELS)

    def recording(name):
        def kernel(problem):
            if problem.queries.shape[0] == segments:
                problems.append(problem)
            return original[name](problem)
        return kernel

    for name in original:
        decode_kernels.KERNELS[name] = recording(name)
    from audiokv_cli.cli import app

    try:
        app(["bench", *bench_args, "--new-tokens", "2", "--repeats", "1", "--no-memory", "--json"],
            standalone_mode=False)
    finally:
        decode_kernels.KERNELS.update(original)
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8, help="KV heads per layer (whisper-base: 8)")
    parser.add_argument("--frames", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("bench_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    bench_args = [a for a in args.bench_args if a != "--"] + ["--batch-sizes", str(args.batch)]
    segments = args.batch * args.heads
    torch.set_num_threads(1)
    problems = capture(bench_args, segments)
    layers: dict[int, object] = {}
    for problem in problems:  # each layer's cache has its own entries: the first problem seen per layer
        layers.setdefault(id(problem.keys), problem)
    first_step = list(layers.values())
    if not first_step:
        sys.exit("no decode problem recorded: check the bench options")
    dim = first_step[0].queries.shape[-1]
    kept = sum(p.layout.total for p in first_step) / (len(first_step) * segments * args.frames)
    print(f"{len(first_step)} layers, {segments} segments each, {kept:.3f} of the frames kept, "
          f"stored as {type(first_step[0].keys).__name__} ({getattr(first_step[0].keys, 'bits', 'float')} bits)")
    for name in decode_kernels.available_kernels("cpu", first_step[0].cache_dtype):
        kernel = decode_kernels.KERNELS[name]
        total = 1e3 * sum(mean_seconds(lambda p=p: kernel(p), CPU, args.repeats) for p in first_step)
        print(f"{name:8s} {total:8.2f} ms")
    query = torch.randn(args.batch, args.heads, 1, dim)
    keys = torch.randn(args.batch, args.heads, args.frames, dim)
    values = torch.randn(args.batch, args.heads, args.frames, dim)
    dense = 1e3 * mean_seconds(
        lambda: torch.nn.functional.scaled_dot_product_attention(query, keys, values), CPU, args.repeats
    )
    print(f"full cache, dense SDPA {dense * len(first_step):8.2f} ms")


if __name__ == "__main__":
    main()
