"""`audiokv profile`, `probe-set`, `inspect` and `merge`: make, look at and combine head profiles."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from audiokv_cli.commands.common import DEVICE_MAP_HELP, DType, Device, DeviceMap, console, load_model, quiet_transformers, stdout
from audiokv_cli.errors import AudiokvError


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


class _RichProgress:
    """Adapts the runner's progress callbacks to a rich progress bar."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.task = None
        self.sensitivity_task = None
        self.steps = 0

    def start(self, total: int, done: int) -> None:
        self.task = self.progress.add_task("profiling", total=total, completed=done, status="")
        if done:
            self.progress.console.print(f"resuming: {done} of {total} clips already profiled")

    def advance(self, outcome) -> None:
        self.steps += outcome.scored_steps
        self.progress.update(self.task, advance=1, status=f"{self.steps} scored steps")

    def sensitivity(self, done: int, total: int) -> None:
        """Per clip of the sensitivity measurement (a bar of its own: it runs after the last profiled clip)."""
        if self.sensitivity_task is None:
            self.sensitivity_task = self.progress.add_task("head sensitivity", total=total, status="")
        self.progress.update(self.sensitivity_task, completed=done, status="clips")


def profile(
    model: str = typer.Option(..., "--model", "-m", help="Model to profile: short name, local directory or Hub id."),
    data: Path = typer.Option(..., "--data", help="manifest.jsonl, or a folder with one (or just audio files, for --aligner whisper:... or none)."),
    out: Path = typer.Option(..., "--out", "-o", help="Profile to write: NAME.safetensors plus NAME.json beside it."),
    aligner: str = typer.Option("manifest", help="Word timings: manifest, whisper:PATH_OR_ID, or none (audio attention mass, no word timings)."),
    top_k: int = typer.Option(24, "--top-k", help="Top attention positions per head and step checked against the word's audio."),
    min_confidence: float = typer.Option(0.95, help="Ignore words whose timing confidence is below this."),
    max_clips: Optional[int] = typer.Option(None, min=1, help="Profile only the first N clips."),
    max_new_tokens: int = typer.Option(128, min=1, help="Stop decoding a clip after this many tokens."),
    teacher_forcing: bool = typer.Option(False, "--teacher-forcing", help="Feed the reference transcript instead of the model's greedy output."),
    checkpoint_every: int = typer.Option(25, min=1, help="Save resumable partial statistics every N clips."),
    sensitivity: Optional[bool] = typer.Option(None, "--sensitivity/--no-sensitivity", help="Also measure what compressing each head alone costs (KL of the next-token distributions on the reference transcripts, one head merged 2:1, 4:1, 8:1, 16:1); budgets use it. Default: on when the clips have transcripts.", show_default=False),
    sensitivity_clips: int = typer.Option(16, "--sensitivity-clips", min=1, help="Measure the head sensitivity on the first N clips (each costs one decoder pass per head and strength)."),
    allow_download: bool = typer.Option(False, "--allow-download", help="Let the Whisper aligner download from the Hugging Face Hub."),
    device: Device = typer.Option(Device.auto, help="Where to run the model."),
    dtype: DType = typer.Option(DType.auto, help="Model weights dtype."),
    device_map: Optional[DeviceMap] = typer.Option(None, help=DEVICE_MAP_HELP),
) -> None:
    """Find the audio-critical heads: decode ASR clips and score how often each head's top attention lands on the
    audio of the word being spoken. Interrupted runs resume when started again with the same --out."""
    from audiokv_cli.parallel.ranks import current_ranks, join, rank_part
    from audiokv_cli.profiling.alignment import read_data
    from audiokv_cli.profiling.profile_file import load_profile, profile_paths
    from audiokv_cli.profiling.runner import ProfileSettings
    from audiokv_cli.parallel.rank_parts import merge_profile_parts, profile_part_out

    settings = ProfileSettings(
        aligner=aligner,
        top_k=top_k,
        min_confidence=min_confidence,
        max_new_tokens=max_new_tokens,
        teacher_forcing=teacher_forcing,
    )
    settings.validate()
    clips = read_data(data)
    if max_clips is not None:
        clips = clips[:max_clips]
    measure = _sensitivity_settings(sensitivity, sensitivity_clips, clips)
    # Under torchrun each rank profiles its share into a part of its own; rank 0 adds the parts (exact).
    ranks = current_ranks()
    join(ranks, device.value)
    with rank_part(ranks):
        mine = ranks.shard(clips)
        target = profile_part_out(out, ranks) if ranks.distributed else out
        if mine:
            # The sensitivity table is measured once, by rank 0 on the first clips of all the data, so a run on
            # several ranks writes the table one process would.
            shard_measure = (measure, clips) if measure is not None and ranks.leader else None
            shard_args = (aligner, allow_download, settings, target, checkpoint_every, ranks.leader, shard_measure)
            result = _profile_shard(model, device, dtype, device_map, mine, *shard_args)
    if ranks.distributed:
        with rank_part(ranks):
            if ranks.leader:
                result = load_profile(merge_profile_parts(out, ranks.world))
        if not ranks.leader:
            return
    tensors_path, json_path = profile_paths(out)
    p = result.provenance
    console.print(
        f"wrote {tensors_path} and {json_path.name}: {p['clips']} clips, {p['words_aligned']} of {p['words']} words "
        f"aligned, {p['scored_steps']} scored steps of {p['decode_steps']}"
    )
    stdout.print(_top_heads_table(result.score, 10))
    if result.sensitivity is not None:
        stdout.print(_sensitivity_table(result.sensitivity, 10))


def _sensitivity_settings(requested: bool | None, count: int, clips):
    """The head sensitivity settings for this run, or None: asked for with --sensitivity (then the clips must have
    transcripts), left out with --no-sensitivity, and by default measured when the clips have transcripts."""
    from audiokv_cli.profiling.sensitivity import SensitivitySettings

    if requested is False:
        return None
    settings = SensitivitySettings(clips=count)
    settings.validate()
    if all((clip.text or "").strip() for clip in clips[:count]):
        return settings
    if requested:
        raise AudiokvError("--sensitivity is measured on the clips' reference transcripts, and the data has none")
    console.print("[yellow]note:[/] the clips have no transcripts: no head sensitivity is measured")
    return None


def _profile_shard(
    model, device, dtype, device_map, clips, aligner, allow_download, settings, out, checkpoint_every, shown, measure
):
    """Profile ``clips`` into ``out``; ``shown`` False (ranks other than 0) keeps the terminal to rank 0;
    ``measure``: (head sensitivity settings, the clips to measure them on), or None."""
    from audiokv_cli.profiling.alignment import make_aligner
    from audiokv_cli.profiling.profile_file import partial_paths
    from audiokv_cli.profiling.runner import run_profile

    adapter = load_model(model, device, dtype, device_map=device_map)
    quiet_transformers()
    with console.status(f"loading aligner {aligner} ..."):
        aligner_impl = make_aligner(aligner, device=str(adapter.device), allow_download=allow_download)
    settings = dataclasses.replace(settings, aligner=aligner_impl.name)
    if aligner_impl.name == "none" and shown:
        console.print("[yellow]note:[/] no word timings: heads are scored by their attention mass on the audio")
    if partial_paths(out)[0].exists():
        console.print(f"[dim]found unfinished run {partial_paths(out)[0]}[/]")
    try:
        sensitivity, sensitivity_data = measure if measure is not None else (None, None)
        if not shown:
            return run_profile(
                adapter, clips, aligner_impl, settings, out, checkpoint_every,
                sensitivity=sensitivity, sensitivity_data=sensitivity_data,
            )
        with _progress() as bar:
            sink = _RichProgress(bar)
            return run_profile(
                adapter, clips, aligner_impl, settings, out, checkpoint_every, sink,
                sensitivity=sensitivity, sensitivity_data=sensitivity_data, sensitivity_progress=sink.sensitivity,
            )
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted;[/] progress saved to {partial_paths(out)[0]}: run the same command to resume")
        raise typer.Exit(130) from None  # that line says it all; no second "interrupted"


def probe_set(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to create with the wavs and manifest.jsonl."),
    n: int = typer.Option(100, "--n", min=1, help="Number of clips."),
    voices: Optional[str] = typer.Option(None, help="Comma-separated espeak-ng voices (default: a mix of en-us and en-gb voices)."),
    seed: int = typer.Option(0, help="Random seed for text, voice speed and pauses."),
    min_words: int = typer.Option(4, min=1, help="Fewest words per clip."),
    max_words: int = typer.Option(10, min=1, help="Most words per clip."),
    text: Optional[list[Path]] = typer.Option(None, help="English text files to read words from (default: /usr/share/common-licenses)."),
) -> None:
    """Synthesize probe clips word by word with espeak-ng, so every word's timing is exact."""
    from audiokv_cli.profiling.probe_set import DEFAULT_VOICES, ProbeOptions, build_probe_set

    chosen = tuple(v.strip() for v in voices.split(",") if v.strip()) if voices else DEFAULT_VOICES
    options = ProbeOptions(n=n, min_words=min_words, max_words=max_words, voices=chosen, seed=seed)
    with _progress() as bar:
        task = bar.add_task("synthesizing", total=n, status="")
        clips = build_probe_set(out, options, text_sources=text, progress=lambda done, total: bar.update(task, completed=done))
    words = sum(len(c.words or []) for c in clips)
    console.print(f"wrote {len(clips)} clips ({words} words) and {out / 'manifest.jsonl'}")


def merge(
    profiles: list[Path] = typer.Argument(..., help="Profiles to add together (same model and settings).", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Merged profile to write."),
) -> None:
    """Add the statistics of profiles made on different clips; the result equals one run over all the clips."""
    from audiokv_cli.profiling.profile_file import load_profile, merge_profiles, profile_paths, save_profile

    if len(profiles) < 2:
        raise AudiokvError("merge needs at least two profiles")
    loaded = [load_profile(path) for path in profiles]
    merged = merge_profiles(loaded, [str(p) for p in profiles])
    path = save_profile(merged, out)
    p = merged.provenance
    console.print(f"wrote {path} and {profile_paths(out)[1].name}: {p['clips']} clips, {p['scored_steps']} scored steps")


def inspect(
    profile_path: Path = typer.Argument(..., metavar="PROFILE", help="A .safetensors head profile.", show_default=False),
    png: Optional[Path] = typer.Option(None, help="Also write a layer x head heatmap image here."),
    top: int = typer.Option(10, min=1, help="How many top heads to list."),
) -> None:
    """Show a head profile: provenance, top heads, per-layer summary and a layer x head heatmap."""
    from audiokv_cli.profiling.profile_file import load_profile

    loaded = load_profile(profile_path)
    score = loaded.score
    stdout.print(_provenance_table(loaded))
    stdout.print(_top_heads_table(score, top))
    stdout.print(_layer_table(score))
    stdout.print(heatmap_text(score))
    if loaded.sensitivity is not None:
        stdout.print(_sensitivity_table(loaded.sensitivity, top))
    if png is not None:
        from audiokv_cli.profiling.plots import write_heatmap_png

        write_heatmap_png(loaded, png)
        console.print(f"wrote {png}")


# --------------------------------------------------------------------------------------------------------- views


def _provenance_table(loaded) -> Table:
    f, p = loaded.fingerprint, loaded.provenance
    table = Table(show_header=False, box=None, padding=(0, 1), pad_edge=False)
    table.add_column(style="dim")
    table.add_column()
    table.add_row("model", f"{f.get('name_or_path')} ({f.get('model_type')})")
    table.add_row(
        "geometry",
        f"{f.get('num_layers')} layers x {f.get('num_query_heads')} query heads ({f.get('num_kv_heads')} KV heads)",
    )
    statistic = "top-K hits on the spoken word" if p["statistic"] == "topk_hits" else "attention mass on audio"
    table.add_row("statistic", f"{statistic}, K={p['top_k']}, aligner {p['aligner']}, {p.get('decoding')}")
    table.add_row(
        "data",
        f"{p.get('clips')} clips, {p.get('words_aligned')} of {p.get('words')} words aligned, "
        f"{p.get('scored_steps')} scored steps (min confidence {p.get('min_confidence')})",
    )
    table.add_row("made", f"{p.get('created')} with audiokv {p.get('audiokv_version')}, {p.get('data_digest', '')[:19]}")
    return table


def _top_heads_table(score, count: int) -> Table:
    flat = score.flatten()
    heads = score.shape[1]
    order = flat.argsort(descending=True)[: min(count, flat.numel())]
    table = Table(title="top heads", title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("layer", justify="right")
    table.add_column("head", justify="right")
    table.add_column("score", justify="right")
    for rank, index in enumerate(order.tolist(), start=1):
        table.add_row(str(rank), str(index // heads), str(index % heads), f"{float(flat[index]):.4f}")
    return table


def _sensitivity_table(sensitivity, count: int) -> Table:
    """The heads that cost most to merge, at the profile's middle strength (ties in order of layer and head)."""
    column = len(sensitivity.strengths) // 2
    table_kl = sensitivity.table[..., column]
    heads = table_kl.shape[1]
    order = table_kl.flatten().argsort(descending=True, stable=True)[: min(count, table_kl.numel())]
    strengths = ", ".join(f"{g}:1" for g in sensitivity.strengths)
    table = Table(
        title=f"most sensitive KV heads (mean KL per token, one head merged {strengths}; "
        f"{sensitivity.clips} clips, {sensitivity.positions} tokens)",
        title_justify="left",
    )
    for name in ("rank", "layer", "kv head", *(f"{g}:1" for g in sensitivity.strengths)):
        table.add_column(name, justify="right")
    for rank, index in enumerate(order.tolist(), start=1):
        layer, head = divmod(index, heads)
        values = [f"{float(v):.4f}" for v in sensitivity.table[layer, head]]
        table.add_row(str(rank), str(layer), str(head), *values)
    return table


def _layer_table(score) -> Table:
    table = Table(title="per layer", title_justify="left")
    for name in ("layer", "mean", "max", "best head"):
        table.add_column(name, justify="right")
    for layer, row in enumerate(score):
        table.add_row(str(layer), f"{float(row.mean()):.4f}", f"{float(row.max()):.4f}", str(int(row.argmax())))
    return table


_BLOCKS = " ░▒▓█"
_COLORS = ("grey23", "blue", "cyan", "yellow", "red")


def heatmap_text(score) -> Text:
    """Layers as rows, heads as columns, one shaded block per head (scaled to the profile's max score)."""
    peak = float(score.max()) if score.numel() else 0.0
    text = Text(f"heatmap (rows = layers, columns = heads; █ = {peak:.4f})\n")
    for layer, row in enumerate(score):
        text.append(f"{layer:>3} ")
        for value in row.tolist():
            level = 0 if peak <= 0 else min(int(value / peak * (len(_BLOCKS) - 1) + 0.5), len(_BLOCKS) - 1)
            text.append(_BLOCKS[level] if level else "·", style=_COLORS[level])
        text.append("\n")
    return text
