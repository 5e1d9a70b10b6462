"""audiokv: KV-cache compression for audio-language models and Whisper.

The public API (docs/api.md): `transcribe` a file or array with a compressed cache, `compress` the cache of a model
loaded with transformers for one `generate` call, `load_model` once for many files. Names are imported on first use,
so `import audiokv_cli` (and the command line's start) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "AudiokvError",
    "ClipResult",
    "CompressedGeneration",
    "Transcript",
    "__version__",
    "compress",
    "load_model",
    "transcribe",
]

_HOMES = {
    "transcribe": "audiokv_cli.api",
    "compress": "audiokv_cli.api",
    "load_model": "audiokv_cli.api",
    "CompressedGeneration": "audiokv_cli.api",
    "ClipResult": "audiokv_cli.runtime.inference",
    "Transcript": "audiokv_cli.runtime.longform",
    "AudiokvError": "audiokv_cli.errors",
}

if TYPE_CHECKING:
    from audiokv_cli.api import CompressedGeneration, compress, load_model, transcribe
    from audiokv_cli.errors import AudiokvError
    from audiokv_cli.runtime.inference import ClipResult
    from audiokv_cli.runtime.longform import Transcript


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'audiokv_cli' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
