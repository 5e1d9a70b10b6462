"""`audiokv eval`: WER of eviction methods over a data set, per retention and scope, with reports and plots."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from audiokv_cli.commands.common import DEVICE_MAP_HELP, DType, Device, DeviceMap, check_range, console, load_model, stdout
from audiokv_cli.parallel.ranks import current_ranks, join, rank_part
from audiokv_cli.errors import AudiokvError
from audiokv_cli.io.files import file_sha256

DEFAULT_METHODS = "full,streamingllm,h2o,snapkv,pyramidkv,adakv,snapkv+sss,audiokv-nosss,audiokv,stride,random"


class Metric(str, Enum):
    wer = "wer"
    cer = "cer"
    accuracy = "accuracy"


# Below this size a decode step's matmuls are too small to split across threads: synchronizing threads costs more
# than it saves, and on a busy machine a second thread that is not scheduled stalls every step (measured 15x slower
# with 2 threads than with 1 on a 2-core machine for a 4-layer, 256-wide decoder).
SMALL_MODEL_PARAMETERS = 500_000_000


def _auto_threads(adapter) -> int:
    import torch

    if adapter.device.type == "cpu" and sum(p.numel() for p in adapter.model.parameters()) < SMALL_MODEL_PARAMETERS:
        return 1
    return torch.get_num_threads()


def _progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]eval[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}", style="dim", markup=False),
        console=console,
        disable=not console.is_terminal,
    )


def _check_lengths(model: str, examples) -> None:
    """Refuse a clip longer than the model family takes before the weights load (file headers, no decoding); the
    Whisper family takes any length (long clips go through the long-form path)."""
    from audiokv_cli.io.audio import AudioError, audio_duration
    from audiokv_cli.models.registry import adapter_class_for

    family = adapter_class_for(model)
    if hasattr(family, "prepare_window"):
        return  # Whisper: a clip longer than its window is transcribed as consecutive windows (longform_rows.py)
    limit = family.max_audio_seconds
    for example in examples:
        seconds = audio_duration(example.audio_path)
        if seconds is not None and seconds > limit + 1e-6:
            raise AudioError(
                f"{example.audio_path}: {seconds:.1f} s of audio is longer than this model's limit of {limit:g} s "
                "(split the file)"
            )


def evaluate(
    data: Path = typer.Option(..., "--data", "-d", help="Data set: a .jsonl manifest, a LibriSpeech tree, or audio files with same-named .txt transcripts.", show_default=False),
    model: str = typer.Option("whisper-base", "--model", "-m", help="Short name (whisper-base: OpenAI Whisper base, assembled offline on first use; whisper-tiny.en; tiny: the bundled decoder-only model; qwen2-audio, ...), local directory or Hub id."),
    methods: str = typer.Option(DEFAULT_METHODS, help="Comma-separated methods; also METHOD+SMOOTHER (snapkv+sss), audiokv-nosss, SCORER+SMOOTHER+BUDGET."),
    retention: str = typer.Option("0.8,0.6,0.4,0.2", help="Comma-separated fractions of the prompt KV to keep, each in (0, 1]."),
    kv_bits: str = typer.Option("auto", "--kv-bits", help="Comma-separated bits per kept element for the retention cells: auto (the model's dtype), 16, 8, 4, 2 (full@4bit: quantization alone)."),
    kv_budget: Optional[str] = typer.Option(None, "--kv-budget", help="Comma-separated byte budgets (fractions of the 16-bit cache): METHOD@budget cells spend each on entries and bits (full@budget: every entry, the most bits that fit)."),
    merge: str = typer.Option("auto", help="Comma-separated: auto (dropped; @budget cells: the frontier's choice), none (dropped; METHOD:drop@budget), mean (folded into the most similar kept neighbour, log-size logit bias: METHOD:merge), values (kvpress MergingPress-style: values only, METHOD:merge-values)."),
    cross_store: str = typer.Option("auto", "--cross-store", help="Encoder-decoders (Whisper): where the cross-attention cache lives. auto: the method's own (audiokv under --kv-budget keeps the encoder output once, every layer's keys and values made from it on the fly, exact at 1/(2 x layers) of the bytes); kv: per layer and head; latent: the encoder output once."),
    budget_bits: str = typer.Option("auto", "--budget-bits", help="Bits for the --kv-budget cells: auto (the shipped frontier's choice) or fixed 16, 8, 4, 2 (METHOD@budget-4bit)."),
    scope: str = typer.Option("all", help="Comma-separated eviction scopes: all, audio (text tokens always kept)."),
    profile: Optional[str] = typer.Option(None, help="Head profile for methods with profile budgets: a file, hf://OWNER/REPO/FILE or OWNER/REPO (default: a matching one from profiles/)."),
    allow_profile_mismatch: bool = typer.Option(False, "--allow-profile-mismatch", help="Use a head profile measured on another checkpoint of the same architecture (refused by default)."),
    max_new_tokens: int = typer.Option(128, min=1, help="Stop each transcript after this many tokens (Whisper clips over 30 s: each 30 s window, at most 224)."),
    out: Path = typer.Option(Path("eval-out"), help="Output directory for results, summary and plot."),
    limit: Optional[int] = typer.Option(None, min=1, help="Evaluate only the first N clips."),
    window: int = typer.Option(32, min=1, help="Observation window: the last prompt tokens, always kept and used for scoring."),
    sss_alpha: float = typer.Option(0.5, help="Spectral smoothing mix (0 = raw scores, 1 = fully smoothed)."),
    sss_rho: float = typer.Option(0.7, help="Spectral smoothing energy kept by the low-pass cutoff, in (0, 1]."),
    kernel: int = typer.Option(7, min=1, help="Pooling kernel for avgpool/maxpool smoothing (odd)."),
    coverage: Optional[float] = typer.Option(None, help="Share of each head's evictable budget kept as evenly spaced positions, in [0, 1] (default: the method's own; audiokv on Whisper: 1)."),
    smooth_over: Optional[str] = typer.Option(None, help="Positions the smoother and --coverage work on: evictable, or audio (text and padding keep raw scores; default: the method's own)."),
    metric: Metric = typer.Option(Metric.wer, help="What the printed tables and the plot show."),
    threads: int = typer.Option(0, min=0, help="CPU threads for torch (0: auto, 1 for small models on CPU, else one per core)."),
    workers: int = typer.Option(1, min=1, help="Processes sharing the clips (CPU: one per core for small models)."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Cells of a clip decoded together as batch rows (default: 1; Whisper: all). Same tokens as one at a time."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run with the same --out: finished clip-cells are kept, not rerun."),
    device: Device = typer.Option(Device.auto, help="auto picks CUDA when present."),
    dtype: DType = typer.Option(DType.auto, help="auto: bfloat16 on CUDA, float32 on CPU."),
    device_map: Optional[DeviceMap] = typer.Option(None, help=DEVICE_MAP_HELP),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the model's repository."),
    decode_kernel: str = typer.Option("auto", help="Decode attention over the compressed cache: auto, matmul, sdpa, varlen, flash-attn, padded."),
) -> None:
    """Evaluate eviction methods at several retentions on a transcribed data set (one prefill per clip)."""
    from audiokv_cli.compression.methods import MethodOptions
    from audiokv_cli.evaluation.datasets import load_dataset
    from audiokv_cli.evaluation.sweep import (
        ModelSource,
        SweepResult,
        parse_bits,
        parse_budgets,
        parse_merges,
        parse_methods,
        parse_retentions,
        parse_scopes,
        plan_cells,
        summarize,
    )
    from audiokv_cli.parallel.rank_parts import gather_rows, write_rows_part

    from audiokv_cli.compression.decode_kernels import KERNEL_NAMES, use_kernel_option

    # Everything the user typed is checked before the model is loaded.
    if decode_kernel not in KERNEL_NAMES:
        raise AudiokvError(f"unknown decode kernel {decode_kernel!r}: use {', '.join(KERNEL_NAMES)}")
    specs = parse_methods(methods)
    retentions = parse_retentions(retention)
    bits_list = parse_bits(kv_bits, "--kv-bits")
    budgets = parse_budgets(kv_budget)
    budget_bits_list = parse_bits(budget_bits, "--budget-bits")
    merges = parse_merges(merge)
    scopes = parse_scopes(scope)
    check_range("--sss-alpha", sss_alpha, 0.0, 1.0)
    check_range("--sss-rho", sss_rho, 0.0, 1.0, low_open=True)
    options = MethodOptions(
        window=window, kernel=kernel, sss_alpha=sss_alpha, sss_rho=sss_rho, coverage=coverage, smooth_over=smooth_over,
        cross_store=None if cross_store == "auto" else cross_store,
    )
    needs_profile = any(spec.uses_profile for spec in specs)
    cell_axes = dict(kv_bits=bits_list, kv_budgets=budgets, budget_bits=budget_bits_list, merges=merges)
    plan_cells([s for s in specs if not s.uses_profile], retentions, scopes, options, **cell_axes)  # validates
    if needs_profile and profile is not None:
        from audiokv_cli.profiling.reference import check_reference

        check_reference(profile)
    if out.exists() and not out.is_dir():
        raise AudiokvError(f"--out {out} exists and is not a directory")
    examples = load_dataset(data, limit=limit)
    _check_lengths(model, examples)

    import torch

    # Under torchrun each rank evaluates its share of the clips; rank 0 gathers the rows and writes the report.
    ranks = current_ranks()
    join(ranks, device.value)
    adapter = load_model(model, device, dtype, trust_remote_code, device_map=device_map)
    use_kernel_option(decode_kernel, adapter.device, adapter.dtype)  # worker processes inherit the choice
    torch.set_num_threads(threads or _auto_threads(adapter))
    profile_path = None
    if needs_profile:
        from audiokv_cli.commands.infer import resolve_head_profile
        from audiokv_cli.profiling.profile_file import find_profile

        profile_path = profile if profile is not None else find_profile(adapter)
        options.head_scores, options.head_sensitivity = resolve_head_profile(adapter, profile, allow_profile_mismatch)
    cells = plan_cells(specs, retentions, scopes, options, **cell_axes)
    source = ModelSource(model, device.value, dtype.value, trust_remote_code, device_map.value if device_map else None)
    journal = _journal(out, adapter, data, cells, max_new_tokens, options, ranks, profile_path)
    done = journal.read() if resume else {}
    if done:
        console.print(f"[dim]resuming: {len(done)} clip-cells already done in {journal.path}[/]")
    try:
        with rank_part(ranks):
            mine = ranks.shard(examples)
            result = _run(
                adapter, source, mine, cells, max_new_tokens, workers, journal.append, done, ranks.leader, batch_size
            )
            if ranks.distributed:
                write_rows_part(out, ranks, result.clips)
    except KeyboardInterrupt:
        saved = f"finished clip-cells are in {journal.path}: add --resume to continue" if journal.path.exists() else "nothing finished yet"
        console.print(f"[yellow]interrupted;[/] {saved}")
        raise typer.Exit(130) from None
    if ranks.distributed:
        if not ranks.leader:
            journal.remove()  # its rows are in its part now
            return
        rows = gather_rows(out, ranks.world, examples, cells)
        result = SweepResult(rows, summarize(cells, rows))

    from audiokv_cli import __version__
    from audiokv_cli.evaluation.report import METRICS, table1, write_report

    metadata = {
        "audiokv_version": __version__,
        "model": adapter.fingerprint(),
        "data": str(data),
        "clips": len(examples),
        "methods": [spec.label for spec in specs],
        "policies": {cell.method: cell.policy.name for cell in cells},
        "retentions": retentions,
        "kv_bits": bits_list,
        "kv_budgets": budgets,
        "budget_bits": budget_bits_list,
        "merge": merges,
        "cross_store": cross_store,
        "scopes": scopes,
        "max_new_tokens": max_new_tokens,
        "window": window,
        "kernel": kernel,
        "sss_alpha": sss_alpha,
        "sss_rho": sss_rho,
        "coverage": coverage,
        "smooth_over": smooth_over,
        "profile": str(profile_path) if profile_path else None,
        "profile_sha256": _profile_identity(profile_path),
        "device": str(adapter.device),
        "dtype": str(adapter.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
    }
    paths = write_report(out, result.clips, result.summary, metadata=metadata, plot_metric=metric.value)
    journal.remove()  # the report holds every row now
    label = METRICS[metric.value][1]
    if all(cell.scope is None for cell in cells):  # only the full cache was asked for
        stdout.print(table1(result.summary, metric=metric.value))
    for name in scopes if any(cell.scope is not None for cell in cells) else []:
        title = f"{label} by retention, scope {name}"
        stdout.print(table1(result.summary, metric=metric.value, scope=name, title=title))
    cells_run = len(examples) * len(cells)
    seconds = sum(row["seconds_compress"] + row["seconds_decode"] for row in result.clips)
    prefill = sum({row["clip"]: row["seconds_prefill"] for row in result.clips}.values())
    console.print(
        f"[dim]{len(examples)} clips x {len(cells)} cells; one prefill per clip "
        f"({prefill / max(len(examples), 1):.2f} s each, {prefill:.1f} s in all), "
        f"{seconds / max(cells_run, 1):.3f} s per clip-cell (compress + decode)[/]"
    )
    console.print(f"wrote {', '.join(sorted(paths))} to {out}/", highlight=False)


def _profile_identity(profile_path) -> str | None:
    """The profile by its bytes where it is a local file (a Hub reference names a pinned file already)."""
    if profile_path is None:
        return None
    return file_sha256(profile_path) if Path(profile_path).is_file() else str(profile_path)


def _journal(out, adapter, data, cells, max_new_tokens, options, ranks, profile_path=None):
    """The resume journal under --out, keyed by everything that makes two runs' rows comparable (the head profile
    by its bytes: the same file under another name resumes, another file under the same name does not)."""
    from audiokv_cli.evaluation.journal import JOURNAL_NAME, Journal

    settings = {
        "model": adapter.fingerprint(),
        "dtype": str(adapter.dtype),
        "data": str(Path(data).resolve()),
        "cells": {f"{cell.method}@{cell.retention}/{cell.scope}": cell.policy.name for cell in cells},
        "max_new_tokens": max_new_tokens,
        "options": [
            options.window, options.kernel, options.sss_alpha, options.sss_rho, options.coverage, options.smooth_over
        ],
        "profile_sha256": _profile_identity(profile_path),
    }
    return Journal(out, settings, ranks.part_name("rows.partial") + ".jsonl" if ranks.distributed else JOURNAL_NAME)


def _run(adapter, source, examples, cells, max_new_tokens, workers, on_row=None, done=None, shown=True,
         batch_size=None):
    """The sweep over the clips one window takes, and (Whisper) the long-form path over the longer clips; rows in
    clip order, then cell order."""
    from audiokv_cli.evaluation.longform_rows import run_long_clips, split_long
    from audiokv_cli.evaluation.sweep import SweepResult, summarize
    from audiokv_cli.runtime.longform import LongformOptions

    short, long = split_long(adapter, examples)
    if not long:
        return _run_short(adapter, source, examples, cells, max_new_tokens, workers, on_row, done, shown, batch_size)
    rows = []
    if short:
        rows = _run_short(adapter, source, short, cells, max_new_tokens, workers, on_row, done, shown, batch_size).clips
    # As in `infer`: --max-new-tokens caps each window (Whisper's own cap is 224 per window).
    options = LongformOptions()
    options.max_new_tokens = min(options.max_new_tokens, max_new_tokens)
    if not shown:  # torchrun ranks other than 0: the terminal is rank 0's
        rows += run_long_clips(adapter, long, cells, options=options, on_row=on_row, done=done)
    else:
        seconds = adapter.max_audio_seconds
        console.print(f"[dim]{len(long)} clip(s) longer than {seconds:g} s: long-form, consecutive {seconds:g} s windows[/]")
        with _progress() as progress:
            finished = sum((example.id, *cell.key) in (done or {}) for example in long for cell in cells)
            task = progress.add_task("", total=len(long) * len(cells), completed=finished)

            def step(clip_id, cell):
                label = cell.method if cell.scope is None else f"{cell.method} @ {cell.retention:g} ({cell.scope})"
                progress.update(task, advance=1, description=f"{clip_id} (long-form): {label}")

            rows += run_long_clips(adapter, long, cells, options=options, on_step=step, on_row=on_row, done=done)
    clip_order = {example.id: index for index, example in enumerate(examples)}
    cell_order = {cell.key: index for index, cell in enumerate(cells)}
    rows.sort(key=lambda row: (clip_order[row["clip"]], cell_order[(row["method"], row["retention"], row["scope"])]))
    return SweepResult(rows, summarize(cells, rows))


def _run_short(adapter, source, examples, cells, max_new_tokens, workers, on_row=None, done=None, shown=True,
               batch_size=None):
    from audiokv_cli.evaluation.sweep import run_sweep, run_sweep_parallel

    if not shown:  # torchrun ranks other than 0: the terminal is rank 0's
        if workers > 1 and len(examples) > 1:
            return run_sweep_parallel(source, examples, cells, max_new_tokens, workers, on_row=on_row, done=done,
                                      batch_size=batch_size)
        return run_sweep(adapter, examples, cells, max_new_tokens, on_row=on_row, done=done, batch_size=batch_size)
    with _progress() as progress:
        task = progress.add_task("", total=len(examples) * len(cells), completed=len(done or {}))

        def step(clip_id, cell):
            label = cell.method if cell.scope is None else f"{cell.method} @ {cell.retention:g} ({cell.scope})"
            progress.update(task, advance=1, description=f"{clip_id}: {label}")

        if workers > 1 and len(examples) > 1:
            return run_sweep_parallel(
                source, examples, cells, max_new_tokens, workers, on_step=step, on_row=on_row, done=done,
                batch_size=batch_size,
            )
        return run_sweep(
            adapter, examples, cells, max_new_tokens, on_step=step, on_row=on_row, done=done, batch_size=batch_size
        )
