import json

from typer.testing import CliRunner

from audiokv_cli.cli import app


def test_bench_measures_every_method(tiny_model_dir):
    result = CliRunner().invoke(
        app,
        ["bench", "--model", str(tiny_model_dir), "--methods", "full,snapkv,stride", "--seconds", "6",
         "--new-tokens", "4", "--repeats", "1", "--retention", "0.4", "--json"],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [row["method"] for row in rows] == ["full", "snapkv", "stride"]
    full, *compressed = rows
    assert full["kept_ratio"] == 1.0
    for row in compressed:
        assert 0.39 <= row["kept_ratio"] <= 0.41
        assert row["new_tokens"] == 4  # EOS ignored: a fixed amount of decode work
        # Prefill never holds more than the compressed layers plus one dense layer (2 layers here).
        assert row["peak_prefill_cache_bytes"] <= row["kv_bytes_kept"] / 2 + row["kv_bytes_full"] / 2 + 64


def test_bench_rejects_unknown_method(tiny_model_dir):
    result = CliRunner().invoke(app, ["bench", "--model", str(tiny_model_dir), "--methods", "full,bogus"])
    assert result.exit_code == 1
    assert "unknown method 'bogus'" in result.output
