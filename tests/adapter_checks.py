"""Checks every model family's adapter passes on its tiny random model; each family's test file calls them.

The family files add what only they know: prompt wording, exact audio spans, positions of their rotary scheme.
"""

from __future__ import annotations

import numpy as np
import soundfile
import torch

from audiokv_cli.audio import SAMPLE_RATE
from audiokv_cli.compression.methods import METHODS, MethodOptions, build_policy
from audiokv_cli.inference import run_clip
from audiokv_cli.testing_masked import assert_matches_masked_dense


def noise_clip(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(SAMPLE_RATE * seconds)) * 0.1).astype(np.float32)


def head_scores(adapter) -> torch.Tensor:
    """A deterministic, uneven head profile (later heads of each layer score higher)."""
    geometry = adapter.geometry
    scores = torch.arange(geometry.num_layers * geometry.num_query_heads, dtype=torch.float32) + 1
    return scores.reshape(geometry.num_layers, geometry.num_query_heads).flip(-1)


def options(adapter) -> MethodOptions:
    return MethodOptions(window=8, head_scores=head_scores(adapter))


def check_lossless_equals_generate(adapter, audio: np.ndarray, steps: int = 8) -> None:
    """Retention 1.0 through the compression path gives plain `generate`'s tokens (up to its EOS)."""
    prepared = adapter.prepare(audio)
    with torch.no_grad():
        reference = adapter.model.generate(**prepared.inputs, max_new_tokens=steps, do_sample=False)
    generated = reference[0, prepared.prompt_tokens :].tolist()
    eos = set(adapter.eos_token_ids)
    expected = [token for token in generated if token not in eos]
    assert generated, "generate produced nothing"
    for method in ("full", "snapkv", "audiokv"):
        result = run_clip(adapter, audio, build_policy(method, 1.0, options(adapter)), max_new_tokens=steps)
        assert result.token_ids == expected[: len(result.token_ids)], method
        assert len(result.token_ids) == len(expected) or result.hit_token_limit, method
        if method != "full":
            assert result.kept_per_head["kept"] == [[prepared.prompt_tokens] * adapter.geometry.num_kv_heads] * len(
                adapter.compressed_layers()
            )


def check_masked_dense(adapter, audio: np.ndarray, steps: int = 4) -> None:
    """At retention 0.4 the compressed logits equal the dense model's with the evicted entries masked out."""
    prepared = adapter.prepare(audio)
    for method in ("snapkv", "audiokv"):
        result = assert_matches_masked_dense(
            adapter, prepared, build_policy(method, 0.4, options(adapter)), steps=steps
        )
        assert 0.5 < result.evicted_fraction < 0.7, method


def check_every_method_runs(adapter, audio: np.ndarray, steps: int = 3) -> None:
    full = None
    for method in METHODS:
        result = run_clip(
            adapter, audio, build_policy(method, 0.4, options(adapter)), max_new_tokens=steps, stop_at_eos=False
        )
        assert result.generated_tokens == steps, method
        full = full or result.kv_bytes_full
        assert result.kv_bytes_full == full, method
        if method != "full":
            # Every head's budget is round(0.4 L), never below the window; kept bytes follow within 1 %.
            assert result.kv_bytes_kept <= 0.41 * full, (method, result.kv_bytes_kept / full)


def check_decode_positions(adapter, audio: np.ndarray, steps: int = 3) -> None:
    """After eviction the cache reports the logical length, so each new token gets the uncompressed position."""
    from audiokv_cli.attention import use_attention_handler
    from audiokv_cli.compression.policy import CompressionSession
    from audiokv_cli.decoding import decode_greedy, prefill

    prepared = adapter.prepare(audio)
    session = CompressionSession(build_policy("snapkv", 0.4, options(adapter)), adapter, prepared)
    with use_attention_handler(adapter, session):
        logits, _ = prefill(adapter, prepared.inputs, session.cache)
        assert session.cache.get_seq_length() == prepared.prompt_tokens
        kept = session.summary()["kept"]
        assert max(max(row) for row in kept) < prepared.prompt_tokens
        decode_greedy(adapter, session.cache, logits, steps, stop_at_eos=False)
    # The first generated token was the prefill's argmax; each later one went through the cache.
    assert session.cache.get_seq_length() == prepared.prompt_tokens + steps - 1


def check_profile(adapter, folder, transcript: str = "alpha bravo charlie") -> None:
    """`audiokv profile`'s loop runs on the family, and the profile it writes loads for it (fingerprint match)."""
    from audiokv_cli.profiling.alignment import Clip, ManifestAligner, WordTiming
    from audiokv_cli.profiling.profile_file import load_head_scores, load_profile
    from audiokv_cli.profiling.runner import ProfileSettings, run_profile

    clips = []
    for index in range(2):
        path = folder / f"probe{index}.wav"
        soundfile.write(str(path), noise_clip(1.5, seed=10 + index), SAMPLE_RATE)
        words = [WordTiming(word, 0.1 + 0.4 * k, 0.45 + 0.4 * k, 1.0) for k, word in enumerate(transcript.split())]
        clips.append(Clip(f"probe{index}", path, transcript, words))
    settings = ProfileSettings(aligner="manifest", top_k=4, max_new_tokens=6, teacher_forcing=True)
    profile = run_profile(adapter, clips, ManifestAligner(), settings, folder / "profile")
    geometry = adapter.geometry
    assert tuple(profile.score.shape) == (geometry.num_layers, geometry.num_query_heads)
    assert profile.provenance["clips"] == 2 and profile.provenance["scored_steps"] > 0
    assert float(profile.score.sum()) > 0
    loaded = load_profile(folder / "profile.safetensors", expect_fingerprint=adapter.fingerprint())
    assert loaded.fingerprint == adapter.fingerprint()
    scores = load_head_scores(folder / "profile.safetensors", adapter)
    result = run_clip(
        adapter, noise_clip(2.0), build_policy("audiokv", 0.4, MethodOptions(window=8, head_scores=scores)),
        max_new_tokens=2, stop_at_eos=False,
    )
    assert result.generated_tokens == 2


def check_registry(directory, adapter_class) -> None:
    """`load_adapter` finds the family by `model_type` through the registry."""
    from audiokv_cli.models.registry import ADAPTERS, adapter_class_for, load_adapter

    assert adapter_class in ADAPTERS
    assert adapter_class_for(str(directory)) is adapter_class
    assert isinstance(load_adapter(str(directory), device="cpu", dtype="float32"), adapter_class)
