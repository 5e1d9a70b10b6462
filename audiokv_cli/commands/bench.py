"""`audiokv bench`: KV memory and decode speed of eviction methods, measured in one run."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from audiokv_cli.commands.common import DType, Device, check_range, console, load_model, stdout


def bench(
    model: str = typer.Option("tiny", "--model", "-m", help="Short name, local directory or Hub id."),
    methods: str = typer.Option("full,snapkv,audiokv", help="Comma-separated methods (full is the reference)."),
    retention: float = typer.Option(0.4, help="Retention for every evicting method."),
    seconds: float = typer.Option(30.0, help="Length of the synthetic clip."),
    new_tokens: int = typer.Option(64, min=2, help="Decode steps timed (EOS ignored)."),
    repeats: int = typer.Option(3, min=1, help="Best of this many runs."),
    profile: Optional[str] = typer.Option(None, help="Head profile for audiokv: a file, hf://OWNER/REPO/FILE or OWNER/REPO (default: one from profiles/)."),
    device: Device = typer.Option(Device.auto),
    dtype: DType = typer.Option(DType.auto),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per method."),
) -> None:
    """Time prefill and decoding and measure the kept KV bytes of each method on the same clip."""
    from audiokv_cli.benchmark import bench_policy, synthetic_clip
    from audiokv_cli.commands.infer import resolve_head_scores
    from audiokv_cli.compression.methods import MethodOptions, resolve_method

    check_range("--retention", retention, 0.0, 1.0, low_open=True)
    check_range("--seconds", seconds, 0.0, 3600.0, low_open=True)
    specs = [resolve_method(name) for name in methods.split(",") if name.strip()]  # fail before loading anything
    options = MethodOptions()
    adapter = load_model(model, device, dtype)
    if any(spec.uses_profile for spec in specs):
        options.head_scores = resolve_head_scores(adapter, profile)
    prepared = adapter.prepare(synthetic_clip(min(seconds, adapter.max_audio_seconds)))
    rows = []
    for spec in specs:
        policy = spec.policy(1.0 if spec.is_full else retention, options)
        with console.status(f"{spec.label} ..."):
            rows.append(bench_policy(adapter, prepared, policy, new_tokens, repeats))
    reference = next((row for row in rows if row.method == "full"), rows[0])
    if as_json:
        for row in rows:
            stdout.print(json.dumps({**row.__dict__, "kept_ratio": row.kept_ratio}), markup=False, highlight=False)
        return
    table = Table(title=f"{adapter.name} on {prepared.audio_seconds:.0f} s of audio, {prepared.prompt_tokens} prompt tokens, {adapter.device.type}")
    for column in ("method", "kept KV", "of full", "peak prefill KV", "prefill s", "decode ms/token", "decode vs full"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=column == "method")
    for row in rows:
        table.add_row(
            row.method if row.method == "full" else f"{row.method} @ {row.retention:g}",
            f"{row.kv_bytes_kept / 2**20:.2f} MiB",
            f"{100 * row.kept_ratio:.1f} %",
            f"{row.peak_prefill_cache_bytes / 2**20:.2f} MiB",
            f"{row.seconds_prefill:.3f}",
            f"{row.ms_per_token:.2f}",
            f"{row.ms_per_token / reference.ms_per_token:.2f}x",
        )
    stdout.print(table)
