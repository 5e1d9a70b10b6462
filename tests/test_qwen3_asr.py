"""The Qwen3-ASR adapter on a tiny random model: prompt and audio spans, long audio (the
checks every family passes: test_families.py)."""

import pytest
import transformers

from audiokv_cli.models.families.qwen3_asr import Qwen3ASRAdapter
from audiokv_cli.models.registry import load_adapter
from tests import adapter_checks as checks

if not hasattr(transformers, "Qwen3ASRForConditionalGeneration"):
    pytest.skip(f"Qwen3-ASR is not in transformers {transformers.__version__}", allow_module_level=True)


@pytest.fixture(scope="module")
def model_dir(family_models):
    return family_models.directory(Qwen3ASRAdapter)


@pytest.fixture(scope="module")
def adapter(family_models):
    return family_models.adapter(Qwen3ASRAdapter)


def test_geometry_and_limits(adapter):
    assert adapter.geometry.num_layers == 2 and adapter.geometry.group_size == 2


@pytest.mark.parametrize("seconds, tokens", [(2.0, 26), (6.3, 82), (45.0, 585)])
def test_prompt_and_exact_audio_span(adapter, seconds, tokens):
    """13 tokens per full second, the last partial second through three stride-2 convolutions; no 30 s cut."""
    prepared = adapter.prepare(checks.noise_clip(seconds))
    ids = prepared.input_ids[0].tolist()
    token = adapter.processor.tokenizer.convert_tokens_to_ids
    start, end = prepared.audio_spans[0]
    assert prepared.audio_spans == [(start, start + tokens)]
    assert ids[start - 1] == token("<|audio_start|>") and ids[end] == token("<|audio_end|>")
    assert prepared.prompt.endswith("<|im_start|>assistant\nlanguage English<asr_text>")
    assert prepared.audio_seconds == pytest.approx(seconds)


def test_free_form_prompt_is_context(adapter):
    prepared = adapter.prepare(checks.noise_clip(1.0), prompt="audiokv, spectral")
    assert prepared.prompt.startswith("<|im_start|>system\naudiokv, spectral<|im_end|>")
    assert prepared.prompt.endswith("<|im_start|>assistant\n")


def test_decode_drops_the_language_header(adapter):
    tokenizer = adapter.processor.tokenizer
    ids = tokenizer("language English<asr_text>hello there")["input_ids"]
    assert adapter.decode(ids) == "hello there"
    assert adapter.decode(tokenizer("hello")["input_ids"]) == "hello"


def test_a_transformers_without_the_family_is_one_line(model_dir, monkeypatch):
    import transformers

    from audiokv_cli.errors import AudiokvError

    # As on a release without the class (transformers' lazy module would re-import a deleted attribute).
    monkeypatch.setattr(transformers, "Qwen3ASRForConditionalGeneration", None)
    with pytest.raises(AudiokvError, match="Qwen3ASRForConditionalGeneration is not in transformers .* newer release"):
        load_adapter(str(model_dir), device="cpu", dtype="float32")
