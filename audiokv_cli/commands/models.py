"""`audiokv models`: the supported model families, their --model names, what is compressed, audio rates and limits,
and shipped profiles."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich import box
from rich.table import Table
from rich.text import Text

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


#: what each kind of adapter evicts from (ModelAdapter.compressed_attention)
COMPRESSED = {"self": "self-attention prompt cache", "cross": "cross-attention cache (encoder frames)"}


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
        rows.append(
            {
                "family": getattr(cls, "family", cls.__name__.removesuffix("Adapter")),
                "model_types": list(cls.model_types),
                "aliases": aliases.get(cls, []),
                "compressed": COMPRESSED[cls.compressed_attention],
                "ms_per_audio_token": round(1000 * seconds, 2) if seconds else None,
                "audio_tokens_per_second": round(1 / seconds, 2) if seconds else None,
                "max_audio_seconds": cls.max_audio_seconds,
                # Whisper: any length as consecutive 30 s windows (longform.py); max_audio_seconds is one window
                "any_length": hasattr(cls, "prepare_window"),
                "default": DEFAULT_MODEL in aliases.get(cls, []),
                "profiles": [path.name for path, model_type in profiles if model_type in cls.model_types],
            }
        )
    return rows


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 120 and seconds % 60 == 0 else f"{seconds:g} s"


def models(as_json: bool = typer.Option(False, "--json", help="Print the table as a JSON list.")) -> None:
    """List the supported model families: --model names, what is compressed, audio rate, longest audio, profiles."""
    rows = family_rows()
    if as_json:
        stdout.print(json.dumps(rows, indent=2), markup=False, highlight=False)
        return
    # Fits 100 columns: --model names never wrap or get cut (they are typed back), the rest wraps at spaces.
    table = Table(title="audiokv model families", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("family", overflow="fold", max_width=16)
    table.add_column("--model", no_wrap=True)
    table.add_column("compresses", no_wrap=True)
    table.add_column("audio tokens/s", justify="right", max_width=8)
    table.add_column("longest clip", max_width=9)
    table.add_column("shipped profile", no_wrap=True)
    for row in rows:
        rate = f"{row['audio_tokens_per_second']:g}" if row["audio_tokens_per_second"] else "-"
        longest = _duration(row["max_audio_seconds"])
        cross = row["compressed"].startswith("cross")
        table.add_row(
            row["family"],
            "\n".join(f"{a} (default)" if a == DEFAULT_MODEL else a for a in row["aliases"]) or "-",
            "audio frames\n(cross-attn)" if cross else "prompt\n(self-attn)",
            rate,
            f"any ({longest} windows)" if row["any_length"] else longest,
            "\n".join(name.removesuffix(".safetensors") for name in row["profiles"]) or "no",
        )
    stdout.print(table)
    note = (
        "compresses: the decoder's self-attention KV cache of the prompt (audio and text tokens), or the decoder's "
        "cross-attention cache over the audio encoder's frames. Shipped profiles are in profiles/ (used by --method "
        f"audiokv). Default --model: {DEFAULT_MODEL}; tiny is the bundled decoder-only demo model. Any local "
        "directory or cached Hub id of these families also works (--model PATH; --json lists their model types); "
        "docs/models.md has the details."
    )
    # The console soft-wraps nothing (long paths stay whole elsewhere): this note wraps to its width itself.
    stdout.print(Text(note), soft_wrap=False)
