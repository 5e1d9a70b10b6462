import json

import numpy as np
import pytest
import soundfile
from typer.testing import CliRunner

from audiokv_cli.cli import app
from tests.conftest import write_tone

runner = CliRunner()

JSON_FIELDS = {
    "clip", "text", "model", "method", "retention", "prompt_tokens", "audio_tokens", "generated_tokens",
    "kv_bytes_full", "kv_bytes_kept", "seconds_prefill", "seconds_decode",
}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "infer" in result.output


def test_infer_json_full_cache(random_model_dir, tone_wav):
    result = invoke("infer", tone_wav, "--model", random_model_dir, "--json", "--max-new-tokens", "6", "--device", "cpu")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert JSON_FIELDS <= set(record)
    assert record["method"] == "full" and record["retention"] == 1.0
    assert record["audio_tokens"] == 50  # 2 s at 40 ms per audio token
    assert record["kv_bytes_full"] == record["kv_bytes_kept"] > 0
    # 2 layers x 2 KV heads x 16 dims x (K and V) x 4 bytes per prompt token
    assert record["kv_bytes_full"] == record["prompt_tokens"] * 2 * 2 * 2 * 16 * 4
    assert 1 <= record["generated_tokens"] <= 6
    assert record["seconds_prefill"] > 0


def test_infer_compressed_json(random_model_dir, tmp_path):
    clip = write_tone(tmp_path / "long.wav", seconds=8.0)
    result = invoke(
        "infer", clip, "--model", random_model_dir, "--json", "--max-new-tokens", "4", "--method", "snapkv",
        "--retention", "0.4", "--smoother", "sss",
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["method"] == "window+sss+uniform"
    assert record["kv_bytes_kept"] <= 0.41 * record["kv_bytes_full"]
    assert record["kv_bytes_kept"] >= 0.39 * record["kv_bytes_full"]


def test_infer_details_split_audio_and_text(random_model_dir, tmp_path):
    clip = write_tone(tmp_path / "clip.wav", seconds=6.0)
    result = invoke(
        "infer", clip, "--model", random_model_dir, "--json", "--details", "--max-new-tokens", "3",
        "--method", "h2o", "--retention", "0.5", "--scope", "audio", "--window", "8",
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    kept = record["kept_per_head"]
    text_tokens = record["prompt_tokens"] - record["audio_tokens"]
    assert len(kept["kept"]) == 2 and len(kept["kept"][0]) == 2  # layers x KV heads
    for layer in range(2):
        for head in range(2):
            assert kept["text_kept"][layer][head] == text_tokens  # scope audio never evicts text
            assert kept["audio_kept"][layer][head] + text_tokens == kept["kept"][layer][head]
    assert record["generated_tokens"] == len(record["token_ids"])


def test_infer_human_output(random_model_dir, tone_wav):
    result = invoke("infer", tone_wav, "--model", random_model_dir, "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    assert "KV cache" in result.output and "prefill" in result.output


def _one_line_error(result, pattern):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error:"), result.output
    assert pattern in " ".join(result.output.split()), result.output


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda d: d / "missing.wav", "no such file"),
        (lambda d: d, "is a directory"),
        (lambda d: (d / "text.wav").write_text("hello\n" * 50) and d / "text.wav", "not a readable audio file"),
        (lambda d: (d / "empty.wav").write_bytes(b"") or d / "empty.wav", "empty file"),
    ],
)
def test_bad_audio_is_one_line(random_model_dir, tmp_path, make, pattern):
    _one_line_error(invoke("infer", make(tmp_path), "--model", random_model_dir), pattern)


def test_zero_length_and_nan_audio(random_model_dir, tmp_path):
    zero = tmp_path / "zero.wav"
    soundfile.write(str(zero), np.zeros(0, dtype=np.float32), 16000)
    _one_line_error(invoke("infer", zero, "--model", random_model_dir), "zero-length")
    nan = tmp_path / "nan.wav"
    data = np.full(16000, 0.1, dtype=np.float32)
    data[5] = np.inf
    soundfile.write(str(nan), data, 16000, subtype="FLOAT")
    _one_line_error(invoke("infer", nan, "--model", random_model_dir), "NaN or infinite")


def test_silent_audio_is_refused(random_model_dir, tmp_path):
    silent = tmp_path / "silent.wav"
    soundfile.write(str(silent), np.zeros(16000, dtype=np.float32), 16000)
    _one_line_error(invoke("infer", silent, "--model", random_model_dir, "--max-new-tokens", "2"), "audio is silent")


def test_too_long_audio(random_model_dir, tmp_path):
    clip = write_tone(tmp_path / "long.wav", seconds=3.0)
    _one_line_error(invoke("infer", clip, "--model", random_model_dir, "--max-seconds", "2"), "longer than this model's limit")


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--retention", "0"], "--retention must be in (0, 1]"),
        (["--retention", "1.5"], "--retention must be in (0, 1]"),
        (["--method", "nonsense"], "unknown method 'nonsense'"),
        (["--method", "snapkv", "--smoother", "wobble", "--retention", "0.5"], "unknown smoother 'wobble'"),
        (["--sss-rho", "0"], "--sss-rho must be in (0, 1]"),
    ],
)
def test_nonsense_options(random_model_dir, tone_wav, args, pattern):
    _one_line_error(invoke("infer", tone_wav, "--model", random_model_dir, *args), pattern)


def test_not_a_model_directory(tmp_path, tone_wav):
    _one_line_error(invoke("infer", tone_wav, "--model", tmp_path), "not a model directory")


def test_unknown_hub_model_offline(tone_wav):
    _one_line_error(invoke("infer", tone_wav, "--model", "someone/no-such-audio-model"), "not in the local Hugging Face cache")


def test_infer_accepts_the_eval_method_names(random_model_dir, tone_wav):
    result = invoke("infer", tone_wav, "--model", random_model_dir, "--json", "--max-new-tokens", "2",
                    "--method", "snapkv+sss", "--retention", "0.5")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["method"] == "snapkv+sss"
