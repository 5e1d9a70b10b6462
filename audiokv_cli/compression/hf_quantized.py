"""transformers' own `QuantizedCache` as a baseline (`--method hf-quanto` / `hf-hqq`): what a user reaches for first.

Every prompt entry is kept, quantized by the optimum-quanto or HQQ backend at ``--kv-bits`` (4 unless given;
transformers' defaults otherwise: groups of 64, a float residual of the newest 128 tokens). It runs on decoder-only
models only (transformers has no quantized encoder-decoder cache). Its kept bytes are counted from the quantized
tensors the cache holds after prefill (codes, scales and shifts) plus its float residual.
"""

from __future__ import annotations

import torch

from audiokv_cli.errors import AudiokvError

BACKENDS = {"hf-quanto": "quanto", "hf-hqq": "hqq"}
PACKAGES = {"quanto": "optimum-quanto", "hqq": "hqq"}


MODULES = {"quanto": "optimum.quanto", "hqq": "hqq"}


def check_backend(method: str) -> None:
    """One line, before any model is loaded, when the backend's package is missing."""
    import importlib.util

    backend = BACKENDS[method]
    try:
        found = importlib.util.find_spec(MODULES[backend]) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise AudiokvError(f"--method {method} needs the {PACKAGES[backend]} package (pip install {PACKAGES[backend]})")


def make_cache(method: str, adapter, bits: int):
    """A fresh `QuantizedCache` for ``adapter``'s text decoder, refused in one line where it cannot run."""
    from transformers import QuantizedCache

    if adapter.compressed_attention == "cross":
        raise AudiokvError(f"--method {method}: transformers' QuantizedCache is for decoder-only models, not {adapter.name}")
    backend = BACKENDS[method]
    if bits not in (2, 4):
        raise AudiokvError(f"--method {method} takes --kv-bits 4 or 2, got {bits}")
    try:
        return QuantizedCache(backend=backend, config=adapter.text_config, nbits=bits)
    except ImportError as error:
        raise AudiokvError(f"--method {method} needs the {PACKAGES[backend]} package: {error}") from None


def tensor_bytes(value) -> int:
    """Bytes of a tensor, looking inside tensor subclasses (quanto's packed tensors) at what they really hold."""
    if value is None:
        return 0
    if isinstance(value, torch.Tensor) and hasattr(value, "__tensor_flatten__") and type(value) is not torch.Tensor:
        names, _ = value.__tensor_flatten__()
        return sum(tensor_bytes(getattr(value, name)) for name in names)
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(item) for item in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    return 0


def kept_bytes(cache) -> int:
    """Quantized keys and values (with their scales) plus the float residual, every layer."""
    total = 0
    for layer in cache.layers:
        for name in ("_quantized_keys", "_quantized_values"):
            stored = getattr(layer, name, None)
            if isinstance(stored, tuple):  # HQQ: (codes, metadata with scales and zeros)
                total += tensor_bytes(stored[0]) + tensor_bytes(stored[1])
            else:
                total += tensor_bytes(stored)
        total += tensor_bytes(getattr(layer, "keys", None)) + tensor_bytes(getattr(layer, "values", None))
    return total
