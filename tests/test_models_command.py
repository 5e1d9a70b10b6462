"""`audiokv models`: every family and short name listed, with the numbers the adapters declare."""

import importlib
import json
from pathlib import Path

from typer.testing import CliRunner

from audiokv_cli.cli import app
from audiokv_cli.models.registry import ADAPTERS, MODEL_ALIASES

ROOT = Path(__file__).resolve().parent.parent


def _json_rows():
    result = CliRunner().invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_every_family_and_alias_is_listed_once():
    rows = _json_rows()
    assert [row["model_types"] for row in rows] == [list(cls.model_types) for cls in ADAPTERS]
    listed = [name for row in rows for name in row["aliases"]]
    assert sorted(listed) == sorted(MODEL_ALIASES)


def test_rows_carry_the_adapters_numbers():
    for row, cls in zip(_json_rows(), ADAPTERS):
        assert row["max_audio_seconds"] == cls.max_audio_seconds
        if cls.seconds_per_audio_token:
            assert abs(row["ms_per_audio_token"] - 1000 * cls.seconds_per_audio_token) < 0.01
    by_family = {row["family"]: row for row in _json_rows()}
    assert by_family["Qwen2-Audio"]["profiles"] == ["tiny.safetensors"]
    assert "tiny" in by_family["Qwen2-Audio"]["aliases"]
    assert by_family["Qwen2-Audio"]["max_audio_seconds"] == 600.0
    assert by_family["Voxtral"]["ms_per_audio_token"] == 80.0


def test_named_tiny_models_and_tests_exist():
    for row in _json_rows():
        if row["tiny_test_model"] is None:
            continue
        module, function = row["tiny_test_model"].split(":")
        assert callable(getattr(importlib.import_module(module), function)), row["family"]
        assert (ROOT / row["tests"]).is_file(), row["tests"]


def test_table_lists_every_family():
    result = CliRunner().invoke(app, ["models"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for cls in ADAPTERS:
        assert getattr(cls, "family", cls.__name__.removesuffix("Adapter")) in result.output
    assert "tiny.safetensors" in result.output
