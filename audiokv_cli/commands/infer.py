"""`audiokv infer`: transcribe or answer about audio clips, with or without KV-cache eviction."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from audiokv_cli.commands.common import (
    DEVICE_MAP_HELP,
    DType,
    Device,
    DeviceMap,
    Scope,
    check_duration,
    check_range,
    console,
    load_clips,
    load_model,
    stdout,
)
from audiokv_cli.errors import AudiokvError
from audiokv_cli.io.output_formats import OutputFormat
from audiokv_cli.runtime.streaming import TextStream


def _human_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def _summary(result) -> Table:
    table = Table(show_header=False, box=None, padding=(0, 1), pad_edge=False)
    table.add_column(style="dim")
    table.add_column()
    method = result.method if result.method == "full" else f"{result.method} (retention {result.retention:g}, scope {result.scope})"
    table.add_row("model", result.model)
    table.add_row("method", method)
    if result.cache_entries and result.cache_entries != result.prompt_tokens:
        # An encoder-decoder: the compressed cache is the encoder frames, not the decoder prompt.
        audio = f"{result.audio_seconds:.1f} s, {result.audio_tokens} audio frames of {result.cache_entries} cached"
    else:
        audio = f"{result.audio_seconds:.1f} s, {result.audio_tokens} audio tokens of {result.prompt_tokens} prompt tokens"
    table.add_row("audio", audio)
    table.add_row("generated", f"{result.generated_tokens} tokens" + (" (hit --max-new-tokens)" if result.hit_token_limit else ""))
    table.add_row(
        "KV cache",
        f"{_human_bytes(result.kv_bytes_kept)} kept of {_human_bytes(result.kv_bytes_full)} ({100 * result.kept_ratio:.1f} %)",
    )
    table.add_row("time", f"prefill {result.seconds_prefill:.3f} s, decode {result.seconds_decode:.3f} s")
    return table


def resolve_head_scores(adapter, profile: Optional[str], allow_mismatch: bool = False):
    """The head scores of the profile `resolve_head_profile` finds."""
    return resolve_head_profile(adapter, profile, allow_mismatch)[0]


def resolve_head_profile(adapter, profile: Optional[str], allow_mismatch: bool = False):
    """The head profile for the audiokv method (the given file or Hub reference, or one in profiles/ made for this
    model) as the budget reads it: head scores and the sensitivity table (None when the profile has none)."""
    from audiokv_cli.profiling.profile_file import find_profile, load_budget_inputs
    from audiokv_cli.profiling.reference import is_hub_reference, locate_profile

    if profile is not None and is_hub_reference(str(profile)):
        profile = locate_profile(str(profile), adapter)
        console.print(f"[dim]using head profile {profile}[/]")
    elif profile is None:
        profile = find_profile(adapter)
        if profile is None:
            raise AudiokvError(
                f"no head profile for {adapter.name} in profiles/; make one with "
                f"`audiokv probe-set --out probes && audiokv profile --model {adapter.name} --data probes --out my.safetensors` "
                "and pass --profile my.safetensors"
            )
        console.print(f"[dim]using head profile {profile}[/]")
    return load_budget_inputs(profile, adapter, allow_mismatch)


def _warn_unused(spec, retention: float | None, profile: str | None) -> None:
    """One line on stderr for an option the method will not use (the run goes on: the answer is still right)."""
    if spec.keeps_all and retention is not None and retention != 1.0:
        console.print(f"[yellow]warning:[/] --method {spec.label} keeps every entry; --retention {retention:g} is ignored")
    if profile is not None and not spec.uses_profile:
        console.print(f"[yellow]warning:[/] --method {spec.label} takes no head profile; --profile {profile} is ignored")


def infer(
    clips: list[Path] = typer.Argument(..., help="Audio files (wav, flac, ogg, mp3, ...).", show_default=False),
    model: str = typer.Option("whisper-base", "--model", "-m", help="Short name (whisper-base: OpenAI Whisper base, assembled offline on first use; whisper-tiny.en; tiny: the bundled decoder-only demo model; qwen2-audio, ...: `audiokv models`), local directory or Hub id."),
    prompt: Optional[str] = typer.Option(None, help="Instruction instead of the default transcription prompt."),
    max_new_tokens: int = typer.Option(256, min=1, help="Stop after this many generated tokens."),
    method: str = typer.Option("full", help="Eviction method: full, streamingllm, h2o, snapkv, pyramidkv, adakv, random, stride, audiokv, or a composition such as snapkv+sss. audiokv: per-head entry counts from the model's head profile (on Whisper with merged entries its sensitivity table where it has one, else its attention scores); on a decoder-only prompt cache each head keeps the entries of its observation-window scores after spectral smoothing, on Whisper's cross-attention cache evenly spaced frames per head, and under --kv-budget the encoder output kept once for every layer (frames at 16, 8 or 4 bits, neighbours merged to fit)."),
    retention: Optional[float] = typer.Option(None, help="Fraction of the prompt's KV entries to keep, in (0, 1] (default 1: the whole cache)."),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="Store kept keys/values in 16 (float16), 8, 4 or 2 bits (packed codes; keys per channel, values per token). Default: the model's dtype."),
    merge: str = typer.Option("auto", help="Evicted entries: auto (dropped; under --kv-budget the shipped frontier's choice), none (dropped), mean (folded into the most similar kept neighbour of the same head; keys and values averaged, log-size logit bias), values (values only, kvpress-style)."),
    kv_budget: Optional[float] = typer.Option(None, "--kv-budget", help="Byte budget: the kept cache takes at most this fraction of its 16-bit size; retention (and bits, unless --kv-bits) are chosen from the shipped frontier. Replaces --retention."),
    cross_store: str = typer.Option("auto", "--cross-store", help="Encoder-decoders (Whisper): where the cross-attention cache lives. auto: the method's own (audiokv under --kv-budget keeps the encoder output once, every layer's keys and values made from it on the fly, exact at 1/(2 x layers) of the bytes); kv: per layer and head; latent: the encoder output once."),
    profile: Optional[str] = typer.Option(None, help="Head profile for --method audiokv: a file, hf://OWNER/REPO/FILE or OWNER/REPO (default: a matching one from profiles/)."),
    allow_profile_mismatch: bool = typer.Option(False, "--allow-profile-mismatch", help="Use a head profile measured on another checkpoint of the same architecture (refused by default)."),
    scope: Scope = typer.Option(Scope.all, help="all: any prompt token may be evicted; audio: text tokens are always kept."),
    window: int = typer.Option(32, min=1, help="Observation window: the last prompt tokens, always kept and used for scoring."),
    sss_alpha: float = typer.Option(0.5, help="Spectral smoothing mix (0 = raw scores, 1 = fully smoothed)."),
    sss_rho: float = typer.Option(0.7, help="Spectral smoothing energy kept by the low-pass cutoff, in (0, 1]."),
    kernel: int = typer.Option(7, min=1, help="Pooling kernel for avgpool/maxpool smoothing (odd)."),
    coverage: Optional[float] = typer.Option(None, help="Share of each head's evictable budget kept as evenly spaced positions, in [0, 1] (default: the method's own; audiokv on Whisper: 1)."),
    smooth_over: Optional[str] = typer.Option(None, help="Positions the smoother and --coverage work on: evictable, or audio (text and padding keep raw scores; default: the method's own)."),
    scorer: Optional[str] = typer.Option(None, help="Override the method's scorer: window, h2o, random, stride, streaming."),
    smoother: Optional[str] = typer.Option(None, help="Override the method's smoother: none, avgpool, maxpool, sss."),
    budget: Optional[str] = typer.Option(None, help="Override the method's budgets: uniform, pyramid, adaptive, profile."),
    device: Device = typer.Option(Device.auto, help="auto picks CUDA when present."),
    dtype: DType = typer.Option(DType.auto, help="auto: bfloat16 on CUDA, float32 on CPU."),
    device_map: Optional[DeviceMap] = typer.Option(None, help=DEVICE_MAP_HELP),
    max_seconds: Optional[float] = typer.Option(None, help="Longest clip accepted (default: the model's limit)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per clip instead of text."),
    stream: bool = typer.Option(False, "--stream", help="Print the text token by token as it is generated."),
    details: bool = typer.Option(False, help="With --json: add token ids and kept audio/text entries per layer and head."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the model's repository."),
    decode_kernel: str = typer.Option("auto", help="Decode attention over the compressed cache: auto, matmul, sdpa, varlen, flash-attn, padded."),
    attn_implementation: Optional[str] = typer.Option(None, help="Attention of the parts audiokv leaves alone (sdpa, eager, flash_attention_2)."),
    batch_size: int = typer.Option(1, min=1, help="Clips decoded together as one batch (left padding; same tokens as one at a time)."),
    prefill_chunk: Optional[int] = typer.Option(None, min=1, help="Prefill in chunks of N tokens, compressing every layer after each chunk (bounded memory for long audio)."),
    language: Optional[str] = typer.Option(None, help="Whisper: the spoken language (en, de, fr, ...; auto detects it; default en). Multilingual checkpoints only."),
    fmt: Optional[OutputFormat] = typer.Option(None, "--format", help="txt, json (segments with start/end times, KV bytes, timings), srt or vtt. Whisper takes audio of any length with json/srt/vtt or over 30 s."),
    output_dir: Optional[Path] = typer.Option(None, help="Write CLIP.<format> per clip here (atomically) instead of printing."),
    condition_on_previous_text: bool = typer.Option(True, help="Whisper long-form: the previous windows' text is the next window's context."),
) -> None:
    """Transcribe (or answer a --prompt about) each clip, keeping only part of the KV cache if asked."""
    from audiokv_cli.compression.decode_kernels import KERNEL_NAMES, use_kernel_option
    from audiokv_cli.compression.methods import MethodOptions, resolve_method
    from audiokv_cli.runtime.inference import run_clip

    if decode_kernel not in KERNEL_NAMES:
        raise AudiokvError(f"unknown decode kernel {decode_kernel!r}: use {', '.join(KERNEL_NAMES)}")
    if retention is not None:
        check_range("--retention", retention, 0.0, 1.0, low_open=True)
    if batch_size > 1 and (stream or prefill_chunk or details):
        raise AudiokvError("--batch-size above 1 does not combine with --stream, --prefill-chunk or --details yet")
    if stream and as_json:
        raise AudiokvError("--stream prints text as it is generated; it does not combine with --json")
    check_range("--sss-alpha", sss_alpha, 0.0, 1.0)
    check_range("--sss-rho", sss_rho, 0.0, 1.0, low_open=True)
    # Validate the method and its parts before paying for audio decoding or model loading.
    options = MethodOptions(
        window=window, scope=scope.value, kernel=kernel, sss_alpha=sss_alpha, sss_rho=sss_rho,
        coverage=coverage, smooth_over=smooth_over, kv_bits=kv_bits, kv_budget=kv_budget,
        merge=None if merge == "auto" else merge, cross_store=None if cross_store == "auto" else cross_store,
    )
    if kv_budget is not None and retention is not None and retention != 1.0:
        raise AudiokvError("--kv-budget chooses the retention itself; give --kv-budget or --retention, not both")
    spec = resolve_method(method).with_parts(scorer, smoother, budget)
    _warn_unused(spec, retention, profile)
    retention = 1.0 if retention is None else retention
    needs_profile = spec.uses_profile
    if not needs_profile:
        policy = spec.policy(retention, options)
    elif profile is not None:
        from audiokv_cli.profiling.reference import check_reference

        check_reference(profile)

    from audiokv_cli.models.base import ModelAdapter

    if fmt is not None and as_json:
        raise AudiokvError("--json and --format both choose the output; use --format json")
    if output_dir is not None and stream:
        raise AudiokvError("--stream prints to the terminal; it does not combine with --output-dir")
    from audiokv_cli.models.registry import adapter_class_for

    family = adapter_class_for(model)
    if _wants_longform(family, clips, fmt, batch_size, prompt, stream, prefill_chunk, details):
        from audiokv_cli.runtime.longform import LongformOptions

        _infer_longform(
            clips, model, spec, options, profile, retention, needs_profile, language, fmt or OutputFormat.txt,
            output_dir, batch_size, max_seconds, max_new_tokens, as_json,
            LongformOptions(condition_on_previous_text=condition_on_previous_text),
            dict(device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                 attn_implementation=attn_implementation, device_map=device_map),
            decode_kernel, allow_profile_mismatch,
        )
        return
    audio = load_clips(clips, max_seconds=max_seconds)
    if max_seconds is None:
        from audiokv_cli.models.registry import adapter_class_for

        # The family's limit is known from the config alone: an over-long clip fails before the weights load.
        family_limit = adapter_class_for(model).max_audio_seconds
        for path, samples in zip(clips, audio):
            check_duration(path, samples, family_limit)
    adapter: ModelAdapter = load_model(model, device, dtype, trust_remote_code, attn_implementation, device_map)
    use_kernel_option(decode_kernel, adapter.device, adapter.dtype)
    limit = max_seconds if max_seconds is not None else adapter.max_audio_seconds
    for path, samples in zip(clips, audio):
        check_duration(path, samples, limit)
    _set_language(adapter, language)
    if model == "tiny":
        console.print("[dim]model: tiny, the bundled small Qwen2-Audio (pass --model qwen2-audio for the real 7B)[/]")
    if needs_profile:
        options.head_scores, options.head_sensitivity = resolve_head_profile(adapter, profile, allow_profile_mismatch)
        policy = spec.policy(retention, options)
    if prefill_chunk:
        from audiokv_cli.compression.chunked import check_chunked

        check_chunked(policy, prefill_chunk)
    if batch_size > 1:
        _infer_batches(adapter, clips, audio, policy, prompt, max_new_tokens, batch_size, as_json, fmt, output_dir)
        return
    for path, samples in zip(clips, audio):
        if stream:
            # No spinner: it would share the terminal line with the tokens being written.
            text_stream = TextStream(adapter.decode, stdout.file)
            result = run_clip(
                adapter, samples, policy, prompt=prompt, max_new_tokens=max_new_tokens, clip=str(path), on_token=text_stream,
                prefill_chunk=prefill_chunk,
            )
            text_stream.finish(result.text)
            console.print(_summary(result))
            continue
        if getattr(adapter, "language", None) == "auto":
            adapter.detect_language(samples)
        with console.status(f"{path.name}: {samples.shape[0] / 16000:.1f} s of audio ..."):
            result = run_clip(
                adapter, samples, policy, prompt=prompt, max_new_tokens=max_new_tokens, clip=str(path),
                prefill_chunk=prefill_chunk,
            )
        if fmt is not None or output_dir is not None:
            from audiokv_cli.io.output_formats import transcript_of_clip

            _emit(transcript_of_clip(result), fmt or OutputFormat.txt, output_dir, details)
            continue
        if as_json:
            stdout.print(json.dumps(result.to_json(details)), markup=False, highlight=False)
        else:
            stdout.print(result.text, markup=False, highlight=False)
            console.print(_summary(result))


def _infer_batches(adapter, paths, audio, policy, prompt, max_new_tokens, batch_size, as_json, fmt=None, output_dir=None) -> None:
    """--batch-size: clips in groups of ``batch_size``, one batch row each, printed in the order given."""
    from audiokv_cli.runtime.batching import check_batchable, run_clips

    check_batchable(adapter)
    for first in range(0, len(paths), batch_size):
        group = list(range(first, min(len(paths), first + batch_size)))
        with console.status(f"clips {first + 1}-{group[-1] + 1} of {len(paths)} as one batch ..."):
            results = run_clips(
                adapter, [audio[i] for i in group], policy, prompt, max_new_tokens, [str(paths[i]) for i in group]
            )
        for result in results:
            if fmt is not None or output_dir is not None:
                from audiokv_cli.io.output_formats import transcript_of_clip

                _emit(transcript_of_clip(result), fmt or OutputFormat.txt, output_dir, False)
                continue
            if as_json:
                stdout.print(json.dumps(result.to_json()), markup=False, highlight=False)
            else:
                stdout.print(result.text, markup=False, highlight=False)
                console.print(_summary(result))



def _set_language(adapter, language: Optional[str]) -> None:
    """--language for Whisper (default en); other families take the language from their prompt."""
    if hasattr(adapter, "set_language"):
        adapter.set_language(language or "en")
    elif language is not None:
        raise AudiokvError(f"--language is for the Whisper family; {adapter.name} takes no language")


def _wants_longform(family, clips, fmt, batch_size, prompt, stream, prefill_chunk, details) -> bool:
    """Whisper runs as consecutive timestamped windows (longform.py) for audio over 30 s, for timed outputs
    (json/srt/vtt) and for --batch-size; a short clip printed as text keeps the one-window path."""
    from audiokv_cli.runtime.longform import probe_seconds

    if not hasattr(family, "prepare_window") or prompt is not None or stream or prefill_chunk:
        return False
    if batch_size > 1 or fmt in (OutputFormat.json, OutputFormat.srt, OutputFormat.vtt):
        return True
    for path in clips:
        seconds = probe_seconds(path)
        if seconds is None or seconds > family.max_audio_seconds + 1e-6:
            return True
    return False


def _emit(transcript, fmt: OutputFormat, output_dir: Optional[Path], details: bool) -> None:
    from audiokv_cli.io.output_formats import render, write_transcript

    if output_dir is not None:
        path = write_transcript(transcript, fmt, output_dir, details)
        console.print(f"[dim]wrote {path}[/]")
    else:
        stdout.print(render(transcript, fmt, details), markup=False, highlight=False, end="")


def _infer_longform(
    clips, model, spec, options, profile, retention, needs_profile, language, fmt, output_dir, batch_size,
    max_seconds, max_new_tokens, as_json, longform_options, load_options, decode_kernel, allow_profile_mismatch=False,
) -> None:
    """Whisper over audio of any length: files streamed window by window, a progress bar of audio seconds and the
    real-time factor, one output per file as soon as it is done (written whole or not at all)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from audiokv_cli.compression.decode_kernels import use_kernel_option
    from audiokv_cli.runtime.longform import AudioStream, transcribe_files

    # Every file is opened (header or, for mp3 and the like, decoded) before the model loads: bad input fails first.
    seconds = []
    for path in clips:
        stream = AudioStream(path)
        seconds.append(stream.seconds)
        stream.close()
        if max_seconds is not None and stream.seconds > max_seconds + 1e-6:
            raise AudiokvError(f"{path}: {stream.seconds:.1f} s of audio is longer than --max-seconds {max_seconds:g}")
    adapter = load_model(model, **load_options)
    use_kernel_option(decode_kernel, adapter.device, adapter.dtype)
    _set_language(adapter, language)
    if needs_profile:
        options.head_scores, options.head_sensitivity = resolve_head_profile(adapter, profile, allow_profile_mismatch)
    policy = spec.policy(retention, options)
    longform_options.max_new_tokens = min(longform_options.max_new_tokens, max_new_tokens)
    total = sum(seconds)
    done = [0.0] * len(clips)
    with Progress(
        TextColumn("{task.description}"), BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} s of audio"), TextColumn("{task.fields[rtf]}"),
        TimeElapsedColumn(), console=console, transient=True,
    ) as progress:
        task = progress.add_task("transcribing", total=max(total, 1e-3), rtf="")
        import time

        started = time.perf_counter()

        def on_progress(index: int, seconds_done: float, seconds_total: float) -> None:
            done[index] = seconds_done
            elapsed = time.perf_counter() - started
            audio_done = sum(done)
            rtf = f"real-time factor {elapsed / audio_done:.2f}" if audio_done else ""
            progress.update(task, completed=audio_done, rtf=rtf, description=Path(clips[index]).name)

        for transcript in transcribe_files(
            adapter, [str(path) for path in clips], policy, longform_options, batch_size=batch_size,
            names=[str(path) for path in clips], on_progress=on_progress,
        ):
            if as_json:
                stdout.print(json.dumps(transcript.to_json()), markup=False, highlight=False)
            else:
                _emit(transcript, fmt, output_dir, False)
