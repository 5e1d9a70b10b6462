"""The Omnilingual ASR LLM adapter on a tiny random model: prompt and audio spans, compressed decoding."""

import pytest
import transformers

from audiokv_cli.audio import AudioError
from audiokv_cli.errors import AudiokvError
from audiokv_cli.models.omniasr import OmniASRAdapter
from audiokv_cli.models.registry import load_adapter
from audiokv_cli.testing_families import build_tiny_omniasr
from tests import adapter_checks as checks

if not hasattr(transformers, "OmniASRForConditionalGeneration"):
    pytest.skip(f"Omnilingual ASR is not in transformers {transformers.__version__}", allow_module_level=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_omniasr(tmp_path_factory.mktemp("tiny-omniasr"))


@pytest.fixture(scope="module")
def adapter(model_dir):
    return load_adapter(str(model_dir), device="cpu", dtype="float32")


def test_registry_finds_the_family(model_dir, adapter):
    checks.check_registry(model_dir, OmniASRAdapter)
    assert adapter.geometry.num_layers == 2 and adapter.geometry.group_size == 2


@pytest.mark.parametrize("seconds, tokens", [(1.0, 49), (2.0, 99), (6.3, 314)])
def test_prompt_and_exact_audio_span(adapter, seconds, tokens):
    """One token per 320 samples after the convolutions (20 ms), then the language marker and the BOS."""
    prepared = adapter.prepare(checks.noise_clip(seconds))
    token = adapter.processor.tokenizer.convert_tokens_to_ids
    assert prepared.audio_spans == [(0, tokens)]
    assert prepared.input_ids[0, tokens:].tolist() == [token("<|lang:eng_latn|>"), token("<s>")]
    assert prepared.prompt == "<extra_id_1><|lang:eng_latn|><s>"
    assert prepared.audio_seconds == pytest.approx(seconds)


def test_free_form_prompt_is_refused(adapter):
    with pytest.raises(AudiokvError, match="takes no instruction"):
        adapter.prepare(checks.noise_clip(1.0), prompt="What is the mood?")


def test_audio_over_the_limit_is_refused(adapter):
    with pytest.raises(AudioError, match="limit of 120 s"):
        adapter.prepare(checks.noise_clip(121.0))


def test_retention_one_equals_generate(adapter):
    checks.check_lossless_equals_generate(adapter, checks.noise_clip(2.0, seed=1))


def test_compressed_logits_equal_the_masked_dense_model(adapter):
    checks.check_masked_dense(adapter, checks.noise_clip(2.0, seed=2))


def test_every_method_runs(adapter):
    checks.check_every_method_runs(adapter, checks.noise_clip(2.0, seed=3))


def test_positions_after_eviction(adapter):
    checks.check_decode_positions(adapter, checks.noise_clip(2.0, seed=4))


def test_profile_runs_and_matches(adapter, tmp_path):
    checks.check_profile(adapter, tmp_path)
