"""The Omnilingual ASR LLM adapter on a tiny random model: prompt and audio spans (the checks every
family passes: test_families.py)."""

import pytest
import transformers

from audiokv_cli.io.audio import AudioError
from audiokv_cli.errors import AudiokvError
from audiokv_cli.models.families.omniasr import OmniASRAdapter
from tests import adapter_checks as checks

if not hasattr(transformers, "OmniASRForConditionalGeneration"):
    pytest.skip(f"Omnilingual ASR is not in transformers {transformers.__version__}", allow_module_level=True)


@pytest.fixture(scope="module")
def adapter(family_models):
    return family_models.adapter(OmniASRAdapter)


def test_geometry_and_limits(adapter):
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
