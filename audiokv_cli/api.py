"""The public Python API: transcribe audio with a compressed KV cache, or compress the cache of a model loaded
with transformers for one `generate` call.

    >>> import audiokv_cli
    >>> result = audiokv_cli.transcribe("meeting.wav", method="audiokv", kv_budget=0.125)
    >>> with audiokv_cli.compress(model, inputs, method="snapkv", retention=0.4) as kv:
    ...     ids = model.generate(**inputs, **kv.generate_kwargs, max_new_tokens=64)

Both go through the same session as the command line (`compression.policy.CompressionSession`): the same methods,
byte budgets, profiles and checks.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from audiokv_cli.errors import AudiokvError
from audiokv_cli.models.base import ModelAdapter


def load_model(
    model: str = "whisper-base", *, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False
) -> ModelAdapter:
    """A model by short name (`audiokv models`), local directory or Hub id, wrapped for audiokv: load it once and
    pass it as ``model=`` to `transcribe` for many files."""
    from audiokv_cli.models.registry import load_adapter

    return load_adapter(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


def _policy(adapter: ModelAdapter, method: str, retention: float | None, kv_budget: float | None,
            kv_bits: int | None, merge: str | None, profile: str | os.PathLike | None,
            allow_profile_mismatch: bool, method_options: dict):
    """The compression policy the command line would build for these options (the profile found and checked)."""
    from audiokv_cli.compression.methods import MethodOptions, resolve_method

    if kv_budget is not None and retention is not None and retention != 1.0:
        raise AudiokvError("kv_budget chooses the retention itself; give kv_budget or retention, not both")
    spec = resolve_method(method)
    options = MethodOptions(kv_bits=kv_bits, kv_budget=kv_budget, merge=merge, **method_options)
    if spec.uses_profile and options.head_scores is None:
        from audiokv_cli.profiling.profile_file import load_budget_inputs, require_profile

        path = profile if profile is not None else require_profile(adapter)
        options.head_scores, options.head_sensitivity = load_budget_inputs(path, adapter, allow_profile_mismatch)
    return spec.policy(1.0 if retention is None else retention, options)


def transcribe(
    audio: str | os.PathLike | np.ndarray,
    model: str | ModelAdapter = "whisper-base",
    *,
    method: str = "full",
    retention: float | None = None,
    kv_budget: float | None = None,
    kv_bits: int | None = None,
    merge: str | None = None,
    profile: str | os.PathLike | None = None,
    allow_profile_mismatch: bool = False,
    prompt: str | None = None,
    language: str = "en",
    max_new_tokens: int = 256,
    device: str = "auto",
    dtype: str = "auto",
    options=None,
    **method_options: Any,
):
    """Transcribe a file or a 16 kHz mono float32 array, the KV cache compressed by ``method``.

    ``model``: a name (loaded for this call) or a model from `load_model` (loaded once for many calls). Whisper
    takes audio of any length (consecutive 30 s windows, each window's cache compressed) and returns a
    `longform.Transcript` (text, timed segments, KV bytes of the largest window and in all, timings), what
    `audiokv infer --format json` writes; other families take one clip up to their limit and return an
    `inference.ClipResult` (text, KV bytes kept and full, timings, per-head counts), what `audiokv infer --json`
    prints. ``retention``/``kv_budget``/``kv_bits``/``merge``/``profile`` are the command line's options;
    further keywords (``window``, ``scope``, ``sss_alpha``, ...) are `MethodOptions` fields. ``options``: Whisper's
    long-form settings (`longform.LongformOptions`: temperatures, guards, previous-text context).
    """
    adapter = model if isinstance(model, ModelAdapter) else load_model(model, device=device, dtype=dtype)
    policy = _policy(adapter, method, retention, kv_budget, kv_bits, merge, profile, allow_profile_mismatch,
                     method_options)
    if hasattr(adapter, "prepare_window"):
        from audiokv_cli.runtime.longform import LongformOptions, transcribe_files

        if prompt is not None:
            raise AudiokvError(f"{adapter.name} transcribes speech; it takes no prompt")
        adapter.set_language(language)
        if options is None:
            options = LongformOptions(max_new_tokens=min(LongformOptions.max_new_tokens, max_new_tokens))
        return next(iter(transcribe_files(adapter, [audio], policy, options)))
    from audiokv_cli.io.audio import load_audio
    from audiokv_cli.runtime.inference import run_clip

    samples = audio if isinstance(audio, np.ndarray) else load_audio(audio, max_seconds=adapter.max_audio_seconds)
    name = "audio" if isinstance(audio, np.ndarray) else str(audio)
    return run_clip(adapter, np.asarray(samples, dtype=np.float32), policy, prompt, max_new_tokens, clip=name)


@dataclass
class CompressedGeneration:
    """What `compress` yields: the keyword arguments that hand `generate` the compressed cache, and the session
    (its resolved policy, kept bytes and per-head counts once the prompt has been prefilled)."""

    generate_kwargs: dict[str, Any]
    session: Any

    @property
    def policy(self):
        return self.session.policy

    def kept_bytes(self) -> int:
        """Bytes the compressed prompt cache holds (after `generate` has prefilled it)."""
        return self.session.kept_bytes()

    def summary(self) -> dict:
        """Kept entries per layer and head (audio and text)."""
        return self.session.summary()


@contextmanager
def compress(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    *,
    processor: Any = None,
    method: str = "audiokv",
    retention: float | None = None,
    kv_budget: float | None = None,
    kv_bits: int | None = None,
    merge: str | None = None,
    profile: str | os.PathLike | None = None,
    allow_profile_mismatch: bool = False,
    **method_options: Any,
) -> Iterator[CompressedGeneration]:
    """Compress the KV cache of a transformers model you loaded yourself, for one prompt, while the block runs.

    ``inputs`` is the processor's output for one prompt (batch 1), as given to ``model.generate``; ``processor``
    is the model's processor, which some families need (Whisper reads its tokenizer). Inside the block
    ``model.generate(**inputs, **kv.generate_kwargs, ...)`` prefills with full attention, compresses the cache as
    ``method`` says, and decodes over what was kept; sampling, stopping criteria and the other `generate`
    arguments work as usual. One `generate` call per block: the cache holds this prompt.
    """
    from audiokv_cli.runtime.attention import use_attention_handler
    from audiokv_cli.compat import cache_kwargs
    from audiokv_cli.compression.policy import CompressionSession
    from audiokv_cli.models.registry import adapter_for_model

    adapter = adapter_for_model(model, processor)
    prepared = adapter.prepared_from_inputs(inputs)
    policy = _policy(adapter, method, retention, kv_budget, kv_bits, merge, profile, allow_profile_mismatch,
                     method_options)
    session = CompressionSession(policy, adapter, prepared)
    # A latent cross-attention cache is built from the encoder output, which generate computes and hands the decoder.
    hook = adapter.capturing_encoder_states(session.model_cache) if session.latent_projections is not None else None
    try:
        with use_attention_handler(adapter, session):
            yield CompressedGeneration(cache_kwargs(model, session.model_cache), session)
    finally:
        if hook is not None:
            hook.remove()
