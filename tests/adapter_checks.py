"""Checks every model family's adapter passes on its random test model; tests/test_families.py runs them over the
registry. The per-family test files add what only one family knows: prompt wording, exact audio spans, limits.
"""

from __future__ import annotations

import dataclasses
import numpy as np
import soundfile
import torch

from audiokv_cli.io.audio import SAMPLE_RATE
from audiokv_cli.compression.methods import METHODS, MethodOptions, build_policy
from audiokv_cli.runtime.inference import run_clip
from audiokv_cli.testing.masked_dense import assert_keeps_planted_spike, assert_matches_masked_dense


def noise_clip(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(SAMPLE_RATE * seconds)) * 0.1).astype(np.float32)


def head_scores(adapter) -> torch.Tensor:
    """A deterministic, uneven head profile (later heads of each layer score higher)."""
    geometry = adapter.geometry
    scores = torch.arange(geometry.num_layers * geometry.num_query_heads, dtype=torch.float32) + 1
    return scores.reshape(geometry.num_layers, geometry.num_query_heads).flip(-1)


def options(adapter) -> MethodOptions:
    return MethodOptions(window=8, head_scores=head_scores(adapter))


def reference_generate(adapter, prepared, steps: int) -> list[int]:
    """Plain transformers `generate` on the prepared clip, greedy: the tokens after the prompt."""
    inputs = prepared.inputs
    if adapter.compressed_attention == "cross":
        # An encoder-decoder takes the audio features and the decoder prompt separately.
        inputs = {"input_features": inputs["input_features"], "decoder_input_ids": prepared.input_ids}
        if "input_features_mask" in prepared.inputs:
            inputs["attention_mask"] = prepared.inputs["input_features_mask"]
    with torch.no_grad():
        reference = adapter.model.generate(**inputs, max_new_tokens=steps, do_sample=False)[0].tolist()
    if adapter.model.config.model_type == "whisper":
        return reference  # Whisper's generate returns the new tokens only
    assert reference[: prepared.prompt_tokens] == prepared.input_ids[0].tolist()
    return reference[prepared.prompt_tokens :]


def check_lossless_equals_generate(adapter, audio: np.ndarray, steps: int = 8) -> None:
    """Retention 1.0 through the compression path gives plain `generate`'s tokens, up to its first EOS, and stops
    where it stops."""
    generated = reference_generate(adapter, adapter.prepare(audio), steps)
    eos = set(adapter.eos_token_ids)
    stop = next((i for i, token in enumerate(generated) if token in eos), len(generated))
    expected = generated[:stop]
    # A reference that ends at once would make the comparison below empty: pick another clip seed if this fails.
    assert len(expected) >= 3, f"generate said {len(expected)} tokens before its EOS: nothing to compare"
    prompt_length = adapter.prepare(audio).compressed_length
    for method in ("full", "snapkv", "stride", "audiokv"):
        result = run_clip(adapter, audio, build_policy(method, 1.0, options(adapter)), max_new_tokens=steps)
        # Whisper's generate counts its forced prompt into max_new_tokens, so it may make fewer tokens than we do.
        assert result.token_ids[: len(expected)] == expected, method
        if stop < len(generated):
            assert result.token_ids == expected, f"{method} did not stop at generate's EOS"
        if method != "full":
            assert result.kept_per_head["kept"] == [[prompt_length] * adapter.geometry.num_kv_heads] * len(
                adapter.compressed_layers()
            )


def check_masked_dense(adapter, audio: np.ndarray, steps: int = 4) -> None:
    """At retention 0.4 the compressed logits equal the dense model's with the evicted entries masked out, and a
    planted spike (an entry every window query attends to) is among the entries kept."""
    prepared = adapter.prepare(audio)
    for method in ("snapkv", "audiokv", "stride"):
        result = assert_matches_masked_dense(adapter, prepared, build_policy(method, 0.4, options(adapter)), steps=steps)
        assert 0.55 < result.evicted_fraction < 0.65, method
    # Scores alone choose the kept entries here: stride keeps evenly spaced ones whatever they score, and AudioKV on
    # a cross-attention cache spends its budget on evenly spaced frames unless coverage is 0.
    for method in ("snapkv", "audiokv"):
        scored = build_policy(method, 0.4, dataclasses.replace(options(adapter), coverage=0.0))
        assert_keeps_planted_spike(adapter, prepared, scored)


def check_every_method_runs(adapter, audio: np.ndarray, steps: int = 3) -> None:
    """Every method decodes and keeps its share: 40 % of the compressed cache (a decoder-only model's prompt cache,
    an encoder-decoder's cross-attention cache over all frames), measured from the cache tensors."""
    geometry = adapter.geometry
    prepared = adapter.prepare(audio)
    full = prepared.compressed_length * 2 * len(adapter.compressed_layers()) * geometry.num_kv_heads * geometry.head_dim * 4
    for method in METHODS:
        result = run_clip(
            adapter, audio, build_policy(method, 0.4, options(adapter)), max_new_tokens=steps, stop_at_eos=False
        )
        assert result.generated_tokens == steps, method
        assert result.kv_bytes_full == full, method
        if method != "full":
            # Every head's budget is round(0.4 L), never below the window; kept bytes follow within 1 %.
            assert 0.39 * full <= result.kv_bytes_kept <= 0.41 * full, (method, result.kv_bytes_kept / full)


def check_decode_positions(adapter, audio: np.ndarray, steps: int = 3) -> None:
    """After eviction the cache reports the logical length, so each new token gets the uncompressed position. On an
    encoder-decoder eviction shrinks the cross-attention cache only: the decoder's self-attention cache, which sets
    the text positions, keeps every token."""
    from audiokv_cli.runtime.attention import use_attention_handler
    from audiokv_cli.compression.policy import CompressionSession
    from audiokv_cli.runtime.decoding import decode_greedy, prefill

    prepared = adapter.prepare(audio)
    session = CompressionSession(build_policy("snapkv", 0.4, options(adapter)), adapter, prepared)
    with use_attention_handler(adapter, session):
        logits, _ = prefill(adapter, prepared.inputs, session.model_cache)
        assert session.cache.get_seq_length() == prepared.compressed_length
        kept = session.summary()["kept"]
        assert max(max(row) for row in kept) < prepared.compressed_length
        decode_greedy(adapter, session.model_cache, logits, steps, stop_at_eos=False)
    # The first generated token was the prefill's argmax; each later one went through the cache.
    if adapter.compressed_attention == "cross":
        assert session.model_cache.self_attention_cache.get_seq_length() == prepared.prompt_tokens + steps - 1
        assert session.cache.get_seq_length() == prepared.compressed_length
    else:
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
