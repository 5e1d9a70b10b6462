"""Time torchao's affine dequantization against audiokv's on a decode-sized tensor (docs/compression.md, "Bytes").

    pip install torchao==0.18.0 && python scripts/frontier/dequant_timing.py

12,000 entries x 64 channels (8 heads x 1,500 Whisper frames), 4-bit codes, per-token groups of 64, one thread.
"""

import time

import torch

from audiokv_cli.compression.quantization import dequantize_per_token, quantize_per_token


def best_ms(function, repeats: int = 50) -> float:
    for _ in range(3):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main() -> None:
    torch.set_num_threads(1)
    x = torch.randn(12_000, 64)
    start = time.perf_counter()
    from torchao.quantization.quant_primitives import (
        MappingType, choose_qparams_affine, dequantize_affine, quantize_affine,
    )

    print(f"import torchao.quantization.quant_primitives: {time.perf_counter() - start:.2f} s")
    block = (1, 64)
    scale, zero = choose_qparams_affine(
        x, MappingType.ASYMMETRIC, block, torch.uint8, 0, 15, eps=1e-6, scale_dtype=torch.float16,
        zero_point_dtype=torch.float16,
    )
    codes = quantize_affine(x, block, scale, zero, torch.uint8, 0, 15)
    torchao_ms = best_ms(
        lambda: dequantize_affine(codes, block, scale, zero, torch.uint8, 0, 15, output_dtype=torch.float32)
    )
    packed, own_scale, minimum = quantize_per_token(x, 4, 64)
    own_ms = best_ms(lambda: dequantize_per_token(packed, own_scale, minimum, 4, torch.float32))
    print(f"torchao dequantize_affine: {torchao_ms:.2f} ms; audiokv dequantize_per_token (packed 4-bit): {own_ms:.2f} ms")


if __name__ == "__main__":
    main()
