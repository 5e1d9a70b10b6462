"""The Qwen2-Audio adapter: audio beyond 30 s as segments, the length limit before loading, compressed decoding."""

import json
import shutil

import numpy as np
import pytest
import soundfile
from typer.testing import CliRunner

from audiokv_cli.io.audio import SAMPLE_RATE, split_audio
from audiokv_cli.cli import app
from audiokv_cli.compression.methods import MethodOptions, build_policy
from audiokv_cli.models.families.qwen2_audio import Qwen2AudioAdapter
from audiokv_cli.testing.masked_dense import assert_matches_masked_dense
from tests.conftest import write_tone


def _clip(seconds, seed=0):
    return (np.random.default_rng(seed).standard_normal(int(SAMPLE_RATE * seconds)) * 0.1).astype(np.float32)


def _tokens(seconds):
    """Audio tokens of one segment: 10 ms mel frames, a stride-2 convolution, stride-2 pooling."""
    frames = round(seconds * 100)
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def test_split_audio_covers_every_sample_in_equal_segments():
    samples = np.arange(45 * SAMPLE_RATE, dtype=np.float32)
    segments = split_audio(samples, 30.0)
    assert [len(s) for s in segments] == [int(22.5 * SAMPLE_RATE)] * 2
    assert np.array_equal(np.concatenate(segments), samples)
    assert [len(s) for s in split_audio(samples[: 30 * SAMPLE_RATE], 30.0)] == [30 * SAMPLE_RATE]
    lengths = [len(s) for s in split_audio(np.zeros(61 * SAMPLE_RATE + 7, dtype=np.float32), 30.0)]
    assert len(lengths) == 3 and max(lengths) <= 30 * SAMPLE_RATE and sum(lengths) == 61 * SAMPLE_RATE + 7


def test_a_45_second_clip_is_two_audio_items(random_adapter):
    prepared = random_adapter.prepare(_clip(45.0))
    assert prepared.extra["audio_segments"] == 2
    assert prepared.inputs["input_features"].shape[0] == 2
    assert len(prepared.audio_spans) == 2
    assert [end - start for start, end in prepared.audio_spans] == [_tokens(22.5)] * 2 == [562, 562]
    assert prepared.audio_tokens == 1124 and prepared.audio_seconds == 45.0
    assert prepared.prompt.count("<|audio_bos|><|AUDIO|><|audio_eos|>") == 2
    ids = prepared.input_ids[0].tolist()
    bos = random_adapter.processor.tokenizer.convert_tokens_to_ids("<|audio_bos|>")
    eos = random_adapter.processor.tokenizer.convert_tokens_to_ids("<|audio_eos|>")
    for start, end in prepared.audio_spans:
        assert ids[start - 1] == bos and ids[end] == eos


def test_library_refuses_audio_over_the_limit(random_adapter, monkeypatch):
    from audiokv_cli.io.audio import AudioError

    monkeypatch.setattr(random_adapter, "max_audio_seconds", 40.0)
    with pytest.raises(AudioError, match="limit of 40 s"):
        random_adapter.prepare(_clip(41.0))


def test_a_30_second_clip_stays_one_item(random_adapter):
    prepared = random_adapter.prepare(_clip(30.0))
    assert prepared.extra["audio_segments"] == 1 and prepared.audio_tokens == 750


def test_cli_reports_what_the_model_heard(random_model_dir, tmp_path):
    clip = write_tone(tmp_path / "long.wav", seconds=45.0)
    result = CliRunner().invoke(
        app, ["infer", str(clip), "--model", str(random_model_dir), "--json", "--max-new-tokens", "2",
              "--method", "snapkv", "--retention", "0.4"],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["audio_seconds"] == 45.0 and record["audio_tokens"] == 1124


@pytest.fixture(scope="module")
def config_only_dir(random_model_dir, tmp_path_factory):
    """The tiny model's config without weights or processor: loading it fails, so any error before is pre-load."""
    directory = tmp_path_factory.mktemp("config-only")
    shutil.copy(random_model_dir / "config.json", directory / "config.json")
    return directory


def _one_line_error(result, pattern):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert pattern in " ".join(result.output.split()), result.output


@pytest.fixture(scope="module")
def over_limit_wav(tmp_path_factory):
    seconds = Qwen2AudioAdapter.max_audio_seconds + 1
    path = tmp_path_factory.mktemp("long") / "over.wav"
    noise = np.random.default_rng(0).integers(-300, 300, int(seconds * SAMPLE_RATE), dtype=np.int16)
    soundfile.write(str(path), noise, SAMPLE_RATE, subtype="PCM_16")
    return path


def test_over_limit_clip_fails_before_the_model_loads(config_only_dir, over_limit_wav):
    result = CliRunner().invoke(app, ["infer", str(over_limit_wav), "--model", str(config_only_dir)])
    _one_line_error(result, "601.0 s of audio is longer than this model's limit of 600 s")
    # The same directory with a short clip reaches loading and fails there: the check above came first.
    short = write_tone(over_limit_wav.parent / "short.wav", seconds=1.0)
    loading = CliRunner().invoke(app, ["infer", str(short), "--model", str(config_only_dir)])
    assert loading.exit_code == 1 and "limit" not in loading.output


def test_eval_refuses_an_over_limit_clip_before_loading(config_only_dir, over_limit_wav, tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"audio": str(over_limit_wav), "text": "noise"}) + "\n")
    result = CliRunner().invoke(
        app, ["eval", "--data", str(manifest), "--model", str(config_only_dir), "--methods", "full",
              "--retention", "1", "--out", str(tmp_path / "out")],
    )
    _one_line_error(result, "longer than this model's limit of 600 s")


def test_segmented_prompt_compresses_like_any_other(random_adapter):
    prepared = random_adapter.prepare(_clip(31.0, seed=4))
    assert prepared.extra["audio_segments"] == 2
    policy = build_policy("snapkv", 0.4, MethodOptions(window=8))
    assert_matches_masked_dense(random_adapter, prepared, policy, steps=3)
