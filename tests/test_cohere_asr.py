"""The Cohere ASR adapter on a tiny random model: the cross-attention cache over the encoder frames (as Whisper's),
the decoder prompt, the clip limit, compressed decoding."""

import pytest
import torch

from audiokv_cli.attention import use_attention_handler
from audiokv_cli.audio import AudioError
from audiokv_cli.compression.methods import build_policy
from audiokv_cli.compression.policy import CompressionSession
from audiokv_cli.decoding import decode_greedy, prefill
from audiokv_cli.errors import AudiokvError
from audiokv_cli.evaluation.cell_batch import run_cells_batched
from audiokv_cli.inference import run_clip
from audiokv_cli.models.cohere_asr import CohereAsrAdapter
from audiokv_cli.models.registry import load_adapter
from audiokv_cli.testing_families import build_tiny_cohere_asr
from tests import adapter_checks as checks

DECODER_PROMPT = [
    "▁", "<|startofcontext|>", "<|startoftranscript|>", "<|emo:undefined|>", "<|en|>", "<|en|>", "<|pnc|>", "<|noitn|>",
    "<|notimestamp|>", "<|nodiarize|>",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_cohere_asr(tmp_path_factory.mktemp("tiny-cohere-asr"))


@pytest.fixture(scope="module")
def adapter(model_dir):
    return load_adapter(str(model_dir), device="cpu", dtype="float32")


def test_registry_finds_the_family(model_dir, adapter):
    checks.check_registry(model_dir, CohereAsrAdapter)
    assert adapter.geometry.num_layers == 2 and adapter.geometry.group_size == 2
    assert adapter.compressed_attention == "cross" and adapter.fingerprint()["compressed_attention"] == "cross"
    # The limit is the feature extractor's one-chunk length.
    assert adapter.max_audio_seconds == adapter.processor.feature_extractor.max_audio_clip_s == 35.0


@pytest.mark.parametrize("seconds, frames", [(2.0, 25), (5.3, 67), (35.0, 438)])
def test_prompt_and_cached_frames(adapter, seconds, frames):
    """The cache holds one encoder frame per 80 ms of the clip, all of them audio; the decoder prompt is the
    processor's, after the decoder start token `generate` puts first (the tiny config's BOS)."""
    prepared = adapter.prepare(checks.noise_clip(seconds))
    assert prepared.compressed_length == frames and prepared.audio_spans == [(0, frames)]
    tokens = adapter.processor.tokenizer.convert_ids_to_tokens(prepared.input_ids[0].tolist())
    assert tokens == ["<|startoftranscript|>"] + DECODER_PROMPT
    assert prepared.audio_seconds == pytest.approx(seconds)


def test_bad_input_is_one_line(adapter):
    with pytest.raises(AudiokvError, match="takes no --prompt"):
        adapter.prepare(checks.noise_clip(1.0), prompt="What is said?")
    with pytest.raises(AudioError, match="limit of 35 s"):
        adapter.prepare(checks.noise_clip(35.5))


def test_retention_one_equals_generate(adapter):
    audio = checks.noise_clip(4.0, seed=1)
    prepared = adapter.prepare(audio)
    with torch.no_grad():
        reference = adapter.model.generate(
            input_features=prepared.inputs["input_features"],
            attention_mask=prepared.inputs["input_features_mask"],
            decoder_input_ids=prepared.input_ids,
            max_new_tokens=8,
            do_sample=False,
        )
    assert reference[0, : prepared.prompt_tokens].tolist() == prepared.input_ids[0].tolist()
    generated = reference[0, prepared.prompt_tokens :].tolist()
    eos = set(adapter.eos_token_ids)
    expected = generated[: next((i for i, token in enumerate(generated) if token in eos), len(generated))]
    assert len(expected) >= 3, "the reference must say something"
    for method in ("full", "snapkv", "audiokv"):
        result = run_clip(adapter, audio, build_policy(method, 1.0, checks.options(adapter)), max_new_tokens=8)
        assert result.token_ids == expected[: len(result.token_ids)], method
        assert len(result.token_ids) == len(expected) or result.hit_token_limit, method
        if method != "full":
            kept = [[prepared.compressed_length] * adapter.geometry.num_kv_heads] * adapter.geometry.num_layers
            assert result.kept_per_head["kept"] == kept


def test_compressed_logits_equal_the_masked_dense_model(adapter):
    checks.check_masked_dense(adapter, checks.noise_clip(3.0, seed=2))


def test_every_method_runs(adapter):
    checks.check_every_method_runs(adapter, checks.noise_clip(2.5, seed=3))


def test_positions_after_eviction(adapter):
    """Eviction shrinks the cross-attention cache only: the decoder's self-attention cache, which sets the text
    positions, keeps every token, and the compressed cache still reports all the clip's frames."""
    prepared = adapter.prepare(checks.noise_clip(2.0, seed=4))
    session = CompressionSession(build_policy("snapkv", 0.4, checks.options(adapter)), adapter, prepared)
    steps = 3
    with use_attention_handler(adapter, session):
        logits, _ = prefill(adapter, prepared.inputs, session.model_cache)
        assert max(max(row) for row in session.summary()["kept"]) < prepared.compressed_length
        decode_greedy(adapter, session.model_cache, logits, steps, stop_at_eos=False)
    assert session.model_cache.self_attention_cache.get_seq_length() == prepared.prompt_tokens + steps - 1
    assert session.cache.get_seq_length() == prepared.compressed_length


def test_batched_cells_decode_like_single_runs(adapter):
    """`audiokv eval` decodes an encoder-decoder's cells as rows of one batch sharing one copy of the features."""
    audio = checks.noise_clip(3.0, seed=5)
    prepared = adapter.prepare(audio)
    policies = [build_policy(m, r, checks.options(adapter)) for m, r in [("full", 1.0), ("snapkv", 0.3), ("h2o", 0.2)]]
    outcomes, _ = run_cells_batched(adapter, prepared, policies, max_new_tokens=4)
    for policy, outcome in zip(policies, outcomes):
        assert outcome.token_ids == run_clip(adapter, audio, policy, max_new_tokens=4).token_ids, policy.name


def test_profile_runs_and_matches(adapter, tmp_path):
    checks.check_profile(adapter, tmp_path)
