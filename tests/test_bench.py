import json

import pytest
from typer.testing import CliRunner

from audiokv_cli.cli import app

REQUIRED = ("method", "retention", "prompt_tokens", "kv_bytes_full", "kv_bytes_kept", "ms_per_token",
            "seconds_prefill", "peak_prefill_cache_bytes")


def _rows(result):
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_bench_measures_every_method(random_model_dir):
    result = CliRunner().invoke(
        app,
        ["bench", "--model", str(random_model_dir), "--methods", "full,snapkv,stride", "--seconds", "6",
         "--new-tokens", "4", "--repeats", "1", "--retention", "0.4", "--json"],
    )
    rows = _rows(result)
    assert [row["method"] for row in rows] == ["full", "snapkv", "stride"]
    full, *compressed = rows
    assert full["kept_ratio"] == 1.0
    for row in compressed:
        assert all(key in row for key in REQUIRED)
        assert 0.39 <= row["kept_ratio"] <= 0.41
        assert row["new_tokens"] == 4  # EOS ignored: a fixed amount of decode work
        # Prefill never holds more than the compressed layers plus one dense layer (2 layers here).
        assert row["peak_prefill_cache_bytes"] <= row["kv_bytes_kept"] / 2 + row["kv_bytes_full"] / 2 + 64
        assert row["seconds_compress"] > 0 and 0 < row["prefill_overhead"] < 1
        # The memory pass sees at least the cache the run builds.
        assert row["peak_memory_bytes"] >= row["peak_prefill_cache_bytes"]


def test_bench_prompt_tokens_batches_and_streams(random_model_dir):
    result = CliRunner().invoke(
        app,
        ["bench", "--model", str(random_model_dir), "--methods", "full,snapkv", "--prompt-tokens", "700",
         "--new-tokens", "3", "--repeats", "1", "--batch-sizes", "1,2", "--memory-gb", "0.5", "--no-memory",
         "--json"],
    )
    full, snapkv = _rows(result)
    assert full["prompt_tokens"] == snapkv["prompt_tokens"] == 700
    assert full["kv_bytes_full"] == snapkv["kv_bytes_full"]
    for row in (full, snapkv):
        assert row["tokens_per_second_batch_1"] > 0 and row["tokens_per_second_batch_2"] > 0
    # Kept bytes at 40 % (plus three generated tokens) buy more than twice the streams.
    assert snapkv["streams_in_budget"] >= 2.3 * full["streams_in_budget"] > 0


def test_bench_kernel_rows(monkeypatch):
    result = CliRunner().invoke(
        app,
        ["bench", "--kernel", "--geometry", "tiny", "--prompt-tokens", "300", "--methods", "full,snapkv,adakv",
         "--retention", "0.4", "--repeats", "1", "--device", "cpu", "--json"],
    )
    rows = _rows(result)
    assert rows[0]["method"] == "full" and rows[0]["kernel"] == "sdpa-dense" and rows[0]["vs_dense"] == 1.0
    for method in ("snapkv", "adakv"):
        backends = {row["kernel"].removesuffix(" (auto)") for row in rows if row["method"] == method}
        assert backends == {"matmul", "sdpa", "padded"}
        assert sum(row["kernel"].endswith("(auto)") for row in rows if row["method"] == method) == 1
    for row in rows:
        assert all(key in row for key in REQUIRED) and row["prompt_tokens"] == 300
        if row["method"] != "full":
            assert 0.38 <= row["kept_ratio"] <= 0.42


@pytest.mark.parametrize(
    "options, message",
    [
        (["--methods", "full,bogus"], "unknown method 'bogus'"),
        (["--batch-sizes", "1,0"], "--batch-sizes must list"),
        (["--decode-kernel", "fastest"], "unknown decode kernel 'fastest'"),
        (["--kernel", "--geometry", "gpt-9"], "unknown geometry 'gpt-9'"),
        (["--memory-gb", "0"], "--memory-gb must be positive"),
        (["--kv-budget-gb", "0"], "--memory-gb must be positive"),
        (["--kv-bits", "3"], "--kv-bits"),
        (["--kv-budget", "1.5"], "--kv-budget"),
        (["--merge", "some"], "--merge"),
    ],
)
def test_bench_rejects_bad_options(random_model_dir, options, message):
    result = CliRunner().invoke(app, ["bench", "--model", str(random_model_dir), *options])
    assert result.exit_code == 1
    assert message in result.output


def test_bench_prefill_chunk_bounds_the_cache(random_model_dir):
    result = CliRunner().invoke(
        app,
        ["bench", "--model", str(random_model_dir), "--methods", "snapkv", "--prompt-tokens", "900",
         "--prefill-chunk", "100", "--retention", "0.2", "--new-tokens", "2", "--repeats", "1", "--no-memory", "--json"],
    )
    (row,) = _rows(result)
    assert row["prefill_chunk"] == 100
    per_token = row["kv_bytes_full"] / row["prompt_tokens"]
    assert row["peak_prefill_cache_bytes"] <= 1.1 * (row["kv_bytes_kept"] + 100 * per_token)


def test_bench_prefill_chunk_refuses_position_methods(random_model_dir):
    result = CliRunner().invoke(app, ["bench", "--model", str(random_model_dir), "--methods", "stride", "--prefill-chunk", "64"])
    assert result.exit_code == 1
    assert "ranks positions by index" in result.output
