"""`audiokv models`: every family and short name listed, with the numbers the adapters declare."""

import json

from typer.testing import CliRunner

from audiokv_cli.cli import app
from audiokv_cli.models.registry import ADAPTERS, MODEL_ALIASES


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
    assert by_family["Qwen2-Audio"]["audio_tokens_per_second"] == 25.0
    assert "tiny" in by_family["Qwen2-Audio"]["aliases"]
    assert by_family["Qwen2-Audio"]["max_audio_seconds"] == 600.0
    assert by_family["Voxtral"]["ms_per_audio_token"] == 80.0


def test_rows_say_what_is_compressed():
    by_family = {row["family"]: row for row in _json_rows()}
    assert by_family["Whisper"]["compressed"] == by_family["Cohere ASR"]["compressed"] == (
        "cross-attention cache (encoder frames)"
    )
    assert by_family["Qwen2-Audio"]["compressed"] == "self-attention prompt cache"
    assert sum(row["compressed"].startswith("cross") for row in _json_rows()) == 2
    # Test-model builders are not user information.
    assert not any("tiny_test_model" in row or "tests" in row for row in _json_rows())


def test_table_fits_100_columns_with_every_name_whole():
    result = CliRunner().invoke(app, ["models"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    assert "…" not in result.stdout  # nothing cut short
    words = {word for line in lines for word in line.split()}
    # Every --model name whole on one line, as it is typed back.
    assert set(MODEL_ALIASES) <= words, set(MODEL_ALIASES) - words
    # A family name may wrap at its spaces (or fold at 16 characters) within its column, never lose a piece.
    header = next(line for line in lines if "--model" in line)
    family_column = "".join(line[: header.index("--model")].replace(" ", "") for line in lines[lines.index(header) :])
    for cls in ADAPTERS:
        family = getattr(cls, "family", cls.__name__.removesuffix("Adapter"))
        assert family.replace(" ", "") in family_column, family
    assert {"whisper-base", "whisper-tiny.en", "tiny"} <= words  # the shipped profiles
    assert "build_tiny" not in result.stdout and "testing" not in result.stdout
