"""--kv-bits, --kv-budget and --merge end to end: the live run, the replayed and batched eval cells and the byte
budget agree, on a decoder-only model and on Whisper's cross-attention cache."""

from __future__ import annotations

import pytest
import torch

from audiokv_cli.io.audio import load_audio
from audiokv_cli.compression.methods import MethodOptions
from audiokv_cli.evaluation.datasets import Example
from audiokv_cli.evaluation.sweep import parse_methods, plan_cells, run_sweep
from audiokv_cli.runtime.inference import run_clip
from audiokv_cli.models.registry import load_adapter
from audiokv_cli.testing.families import build_random_whisper
from tests.conftest import write_tone


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    path = build_random_whisper(tmp_path_factory.mktemp("tiny-whisper"))
    return load_adapter(str(path), device="cpu", dtype="float32")


def head_scores(adapter):
    generator = torch.Generator().manual_seed(0)
    return torch.rand(adapter.geometry.num_layers, adapter.geometry.num_query_heads, generator=generator)


def cells_for(adapter):
    options = MethodOptions(window=8, head_scores=head_scores(adapter))
    specs = parse_methods("full,snapkv,stride,audiokv")
    return plan_cells(
        specs, [0.5], ["all"], options, kv_bits=(None, 4), kv_budgets=(0.2, 0.08), budget_bits=(None, 16, 2),
        merges=("none", "mean", "values"),
    )


@pytest.mark.parametrize("model", ["decoder-only", "whisper"])
def test_cells_match_live_runs_and_budgets_hold(model, random_adapter, whisper, tmp_path):
    adapter = random_adapter if model == "decoder-only" else whisper
    clip = write_tone(tmp_path / "clip.wav", seconds=3.0)
    audio = load_audio(clip)
    cells = cells_for(adapter)
    labels = {cell.method for cell in cells}
    assert {"full@4bit", "snapkv@4bit", "audiokv:merge@budget", "stride:merge-values@budget-2bit"} <= labels
    example = [Example("clip", clip, "a b c")]
    one_by_one = run_sweep(adapter, example, cells, 5, load_audio=lambda p: audio, batch_size=1).clips
    batched = run_sweep(adapter, example, cells, 5, load_audio=lambda p: audio, batch_size=7).clips
    stored = set()
    for cell, row, row_batched in zip(cells, one_by_one, batched):
        live = run_clip(adapter, audio, cell.policy, max_new_tokens=5)
        assert row["hyp"] == live.text == row_batched["hyp"], cell.method
        # One way of counting bytes: live runs, single cells and batch rows agree exactly.
        assert row["kv_bytes_kept"] == live.kv_bytes_kept == row_batched["kv_bytes_kept"], cell.method
        assert row["kv_bytes_full_16bit"] == live.kv_bytes_full_16bit
        assert row["kv_bits"] == live.kv_bits
        if cell.policy.kv_budget is not None:
            assert live.kv_bytes_kept <= cell.policy.kv_budget * live.kv_bytes_full_16bit, cell.method
            assert live.kv_budget == cell.policy.kv_budget
        stored.add((row["kv_bits"], row["kv_bytes_kept"]))
    assert len(stored) > 8  # the cells really store different things
    bits = {row["method"]: row["kv_bits"] for row in one_by_one}
    assert bits["full"] == 32 and bits["full@4bit"] == 4 and bits["snapkv:drop@budget-2bit"] == 2


def test_quantized_cross_attention_cache_holds_codes_not_floats(whisper, tmp_path):
    from audiokv_cli.compression.policy import CompressionSession
    from audiokv_cli.compression.quantization import QuantizedEntries
    from audiokv_cli.runtime.attention import use_attention_handler
    from audiokv_cli.runtime.decoding import prefill
    from audiokv_cli.compression.methods import build_policy

    audio = load_audio(write_tone(tmp_path / "clip.wav", seconds=2.0))
    prepared = whisper.prepare(audio)
    policy = build_policy("full", 1.0, MethodOptions(kv_bits=2))
    session = CompressionSession(policy, whisper, prepared)
    with use_attention_handler(whisper, session):
        prefill(whisper, prepared.inputs, session.model_cache)
    compressed = [layer for layer in session.cache.layers if layer.compressed]
    assert len(compressed) == whisper.geometry.num_layers
    for layer in compressed:
        assert isinstance(layer.flat_keys, QuantizedEntries) and layer.flat_keys.codes.dtype == torch.uint8
        assert layer.flat_keys.per_channel and not layer.flat_values.per_channel
    full_16bit = prepared.compressed_length * whisper.geometry.kv_bytes_per_token(torch.float16)
    # 2-bit codes plus scales (a larger share on this model's 16-wide heads): a fifth of the 16-bit cache.
    assert session.kept_bytes() <= 0.21 * full_16bit


def test_merge_keeps_counts_and_changes_output(random_adapter, tmp_path):
    from audiokv_cli.compression.methods import build_policy

    audio = load_audio(write_tone(tmp_path / "clip.wav", seconds=3.0))
    options = MethodOptions(window=8)
    dropped = run_clip(random_adapter, audio, build_policy("stride", 0.3, options), max_new_tokens=6)
    merged = run_clip(
        random_adapter, audio, build_policy("stride", 0.3, MethodOptions(window=8, merge="mean")), max_new_tokens=6
    )
    assert merged.kept_per_head == dropped.kept_per_head  # the same entries survive ...
    # ... each carrying a 2-byte bias per entry.
    entries = sum(sum(layer) for layer in merged.kept_per_head["kept"])
    assert merged.kv_bytes_kept == dropped.kv_bytes_kept + 2 * entries


def test_transformers_quantized_cache_baseline(random_adapter, whisper, tmp_path):
    """hf-quanto: transformers' QuantizedCache (optimum-quanto backend) as an eval cell, bytes from its tensors."""
    pytest.importorskip("optimum.quanto")
    from audiokv_cli.compression.methods import build_policy
    from audiokv_cli.errors import AudiokvError

    clip = write_tone(tmp_path / "clip.wav", seconds=3.0)
    audio = load_audio(clip)
    cells = plan_cells(parse_methods("full,hf-quanto"), [0.5], ["all"], MethodOptions(window=8), kv_bits=(None, 4, 2))
    assert [cell.method for cell in cells] == ["full", "full@4bit", "full@2bit", "hf-quanto@4bit", "hf-quanto@2bit"]
    rows = run_sweep(random_adapter, [Example("clip", clip, "a b c")], cells, 5, load_audio=lambda p: audio).clips
    by_method = {row["method"]: row for row in rows}
    for bits in (4, 2):
        row = by_method[f"hf-quanto@{bits}bit"]
        live = run_clip(
            random_adapter, audio, build_policy("hf-quanto", 1.0, MethodOptions(kv_bits=bits)), max_new_tokens=5
        )
        assert row["hyp"] == live.text and row["kv_bytes_kept"] == live.kv_bytes_kept
        # Codes plus scales: far below the 16-bit cache, above what the bits alone would take.
        assert bits / 16 < row["kept_ratio_16bit"] < (bits + 4) / 16
    with pytest.raises(AudiokvError, match="decoder-only"):
        run_clip(whisper, audio, build_policy("hf-quanto", 1.0, MethodOptions()), max_new_tokens=3)
    with pytest.raises(AudiokvError, match="4 or 2"):
        build_policy("hf-quanto", 1.0, MethodOptions(kv_bits=8))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kv-bits", "3"], "--kv-bits must be one of"),
        (["--kv-budget", "0"], "--kv-budget must be in (0, 1]"),
        (["--kv-budget", "0.2", "--retention", "0.5", "--method", "snapkv"], "not both"),
        (["--merge", "sum", "--method", "snapkv"], "--merge must be one of"),
        (["--prefill-chunk", "32", "--kv-bits", "4", "--method", "snapkv"], "does not combine"),
        (["--method", "snapkv", "--kv-budget", "0.001"], "cannot hold"),
    ],
)
def test_bad_storage_options_are_one_line_errors(args, message, tmp_path):
    from typer.testing import CliRunner

    from audiokv_cli.cli import app

    clip = write_tone(tmp_path / "clip.wav", seconds=2.0)
    result = CliRunner().invoke(app, ["infer", str(clip), "--model", "tiny", *args])
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in result.output
