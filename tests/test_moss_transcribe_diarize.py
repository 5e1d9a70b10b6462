"""The MOSS-Transcribe-Diarize adapter on a tiny random model: prompt, audio spans split by time markers, long
audio, diarized output (the checks every family passes: test_families.py)."""

import pytest
import transformers

from audiokv_cli.io.audio import AudioError
from audiokv_cli.models.families.moss_transcribe_diarize import MossTranscribeDiarizeAdapter
from audiokv_cli.testing.families import MOSS_TRANSCRIBE_DIARIZE_INSTRUCTION
from tests import adapter_checks as checks

if not hasattr(transformers, "MossTranscribeDiarizeForConditionalGeneration"):
    pytest.skip(f"MOSS-Transcribe-Diarize is not in transformers {transformers.__version__}", allow_module_level=True)

ASR_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|>\n"
    f"{MOSS_TRANSCRIBE_DIARIZE_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def adapter(family_models):
    return family_models.adapter(MossTranscribeDiarizeAdapter)


def test_geometry_and_limits(adapter):
    assert adapter.geometry.num_layers == 2 and adapter.geometry.group_size == 2
    assert MossTranscribeDiarizeAdapter.max_audio_seconds == 3600.0


@pytest.mark.parametrize(
    "seconds, windows, tokens, markers",
    [(2.0, 1, 25, [2]), (5.3, 1, 67, [2, 4]), (45.0, 2, 375 + 188, list(range(2, 46, 2)))],
)
def test_prompt_and_exact_audio_spans(adapter, seconds, windows, tokens, markers):
    """80 ms per token, each 30 s window rounded up on its own; the elapsed seconds are written as text after every
    25 audio tokens (2 s), so the audio is one span per 2 s with the markers between them."""
    prepared = adapter.prepare(checks.noise_clip(seconds))
    assert prepared.inputs["input_features"].shape[0] == windows
    tokenizer = adapter.processor.tokenizer
    ids = prepared.input_ids[0].tolist()
    start = ids.index(tokenizer.convert_tokens_to_ids("<|audio_start|>")) + 1
    end = ids.index(tokenizer.convert_tokens_to_ids("<|audio_end|>"))
    audio = adapter.audio_token_id
    rendered = "".join("#" if token == audio else tokenizer.decode([token]) for token in ids[start:end])
    expected = "".join("#" * 25 + str(second) for second in markers) + "#" * (tokens - 25 * len(markers))
    assert rendered == expected
    assert prepared.audio_tokens == tokens and prepared.audio_spans[0][0] == start
    assert [stop - begin for begin, stop in prepared.audio_spans] == [
        length for length in [25] * len(markers) + [tokens - 25 * len(markers)] if length
    ]
    assert prepared.prompt == ASR_PROMPT
    assert prepared.audio_seconds == pytest.approx(seconds)


def test_prompt_is_context_before_the_instruction(adapter):
    prepared = adapter.prepare(checks.noise_clip(1.0), prompt="Speakers: Ann, Bob.")
    context = "补充信息：Speakers: Ann, Bob.\n\n"
    assert f"<|audio_end|>\n{context}{MOSS_TRANSCRIBE_DIARIZE_INSTRUCTION}<|im_end|>" in prepared.prompt


def test_decode_keeps_the_spoken_text(adapter):
    tokenizer = adapter.processor.tokenizer
    ids = tokenizer("[0.00][S01]hello there[1.50][1.62][S02]good bye[3.00]", add_special_tokens=False)["input_ids"]
    assert adapter.decode(ids) == "hello there good bye"
    plain = tokenizer("a free answer", add_special_tokens=False)["input_ids"]
    assert adapter.decode(plain) == "a free answer"


def test_audio_over_the_limit_is_refused(adapter, monkeypatch):
    monkeypatch.setattr(adapter, "max_audio_seconds", 60.0)
    with pytest.raises(AudioError, match="limit of 60 s"):
        adapter.prepare(checks.noise_clip(61.0))
