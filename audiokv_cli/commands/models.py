"""`audiokv models`: the supported model families, their short names, audio rates and limits, and shipped profiles."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from audiokv_cli.commands.common import stdout


def _alias_family(name: str, alias) -> type | None:
    """The adapter class an alias loads, without loading it (and without the network)."""
    from audiokv_cli.errors import AudiokvError
    from audiokv_cli.models.registry import ADAPTERS, adapter_class_for

    if alias.model_type is not None:
        return next((cls for cls in ADAPTERS if alias.model_type in cls.model_types), None)
    try:
        return adapter_class_for(name)  # local targets (the bundled model, assembled assets)
    except AudiokvError:
        return None


def _shipped_profiles() -> list[tuple[Path, str]]:
    """(profile file, fingerprint model_type) of every profile in the default profile folders."""
    from audiokv_cli.profiling.profile_file import ProfileError, _candidates, default_profile_dirs, read_metadata

    found = []
    for path in _candidates(default_profile_dirs()):
        try:
            found.append((path, read_metadata(path)["fingerprint"].get("model_type")))
        except ProfileError:
            continue
    return found


#: what `infer`, `eval` and `bench` run without --model
DEFAULT_MODEL = "whisper-base"


def family_rows() -> list[dict]:
    """One record per adapter family: what `audiokv models` prints."""
    from audiokv_cli.models.registry import ADAPTERS, MODEL_ALIASES

    profiles = _shipped_profiles()
    aliases: dict[type, list[str]] = {}
    for name, alias in MODEL_ALIASES.items():
        family = _alias_family(name, alias)
        if family is not None:
            aliases.setdefault(family, []).append(name)
    rows = []
    for cls in ADAPTERS:
        seconds = cls.seconds_per_audio_token
        module = cls.__module__.rsplit(".", 1)[-1]
        rows.append(
            {
                "family": getattr(cls, "family", cls.__name__.removesuffix("Adapter")),
                "model_types": list(cls.model_types),
                "aliases": aliases.get(cls, []),
                "ms_per_audio_token": round(1000 * seconds, 2) if seconds else None,
                "audio_tokens_per_second": round(1 / seconds, 2) if seconds else None,
                "max_audio_seconds": cls.max_audio_seconds,
                # Whisper: any length as consecutive 30 s windows (longform.py); max_audio_seconds is one window
                "any_length": hasattr(cls, "prepare_window"),
                "default": DEFAULT_MODEL in aliases.get(cls, []),
                "profiles": [path.name for path, model_type in profiles if model_type in cls.model_types],
                "tiny_test_model": getattr(cls, "tiny_model", None),
                "tests": f"tests/test_{module}.py",
            }
        )
    return rows


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 120 and seconds % 60 == 0 else f"{seconds:g} s"


def models(as_json: bool = typer.Option(False, "--json", help="Print the table as a JSON list.")) -> None:
    """List the supported model families with their short names, audio rate, longest audio and shipped profiles."""
    rows = family_rows()
    if as_json:
        stdout.print(json.dumps(rows, indent=2), markup=False, highlight=False)
        return
    table = Table(title="audiokv model families", title_justify="left", show_lines=True)
    for column in ("family", "model_type", "short names (--model)", "audio token", "longest audio", "profile",
                   "tiny test model"):
        table.add_column(column, overflow="fold")
    for row in rows:
        rate = f"{row['ms_per_audio_token']:.3g} ms" if row["ms_per_audio_token"] else "-"
        tiny = (row["tiny_test_model"] or "-").removeprefix("audiokv_cli.").replace(":", ".")
        table.add_row(
            row["family"],
            "\n".join(row["model_types"]),
            "\n".join(f"{a} (default)" if a == DEFAULT_MODEL else a for a in row["aliases"]) or "-",
            rate,
            f"any length ({_duration(row['max_audio_seconds'])} windows)" if row["any_length"] else _duration(row["max_audio_seconds"]),
            "\n".join(row["profiles"]) or "none",
            f"{tiny}\n{row['tests']}",
        )
    stdout.print(table)
    stdout.print(
        f"Default model of infer, eval and bench: {DEFAULT_MODEL} (profile needs --model; --model tiny is the bundled "
        "decoder-only demo model). "
        "Any local directory or cached Hub id whose config has one of these model types also works (--model PATH); "
        "docs/models.md says what is compressed and how to profile each family."
    )
