"""The Cohere ASR adapter on a tiny random model: the cross-attention cache over the encoder frames (as Whisper's),
the decoder prompt, the clip limit (the checks every family passes: test_families.py)."""

import pytest

from audiokv_cli.io.audio import AudioError
from audiokv_cli.errors import AudiokvError
from audiokv_cli.models.families.cohere_asr import CohereAsrAdapter
from tests import adapter_checks as checks

DECODER_PROMPT = [
    "▁", "<|startofcontext|>", "<|startoftranscript|>", "<|emo:undefined|>", "<|en|>", "<|en|>", "<|pnc|>", "<|noitn|>",
    "<|notimestamp|>", "<|nodiarize|>",
]


@pytest.fixture(scope="module")
def adapter(family_models):
    return family_models.adapter(CohereAsrAdapter)


def test_geometry_and_limits(adapter):
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
