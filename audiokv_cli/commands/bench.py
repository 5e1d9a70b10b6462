"""`audiokv bench`: KV memory and decode speed of eviction methods, measured in one run."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from audiokv_cli.commands.common import DType, Device, check_range, console, load_model, stdout
from audiokv_cli.errors import AudiokvError


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise AudiokvError(f"--batch-sizes takes comma-separated whole numbers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise AudiokvError(f"--batch-sizes must list batch sizes of at least 1, got {text!r}")
    return sizes


def _print_rows(records: list[dict]) -> None:
    for record in records:
        stdout.print(json.dumps(record), markup=False, highlight=False)


#: the synthetic clip's length when --seconds is not given
DEFAULT_SECONDS = 30.0


def bench(
    model: str = typer.Option("whisper-base", "--model", "-m", help="Short name (default whisper-base; tiny: the bundled decoder-only model), local directory or Hub id."),
    methods: str = typer.Option("full,snapkv,audiokv", help="Comma-separated methods (full is the reference)."),
    retention: float = typer.Option(0.4, help="Retention for every evicting method."),
    seconds: Optional[float] = typer.Option(None, help="Length of the synthetic clip (default 30 s, or the model's limit if shorter); with --prompt-tokens, the most audio the prompt may hold."),
    prompt_tokens: Optional[int] = typer.Option(None, min=2, help="A prompt of exactly N tokens: synthetic audio up to the model's limit, filler text for the rest."),
    new_tokens: int = typer.Option(64, min=2, help="Decode steps timed (EOS ignored)."),
    repeats: int = typer.Option(3, min=1, help="Best of this many runs, interleaved across methods."),
    batch_sizes: str = typer.Option("1", help="Decode tokens/s at each batch size (copies of the prompt), e.g. 1,4,8."),
    memory_gb: Optional[float] = typer.Option(None, "--memory-gb", help="Concurrent streams of this prompt whose KV fits in this many GB."),
    kv_budget_gb: Optional[float] = typer.Option(None, "--kv-budget-gb", hidden=True, help="Old name of --memory-gb."),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="Evicting methods store kept keys/values in 16, 8, 4 or 2 bits."),
    kv_budget: Optional[float] = typer.Option(None, "--kv-budget", help="Evicting methods spend this byte budget (fraction of the 16-bit cache) on entries and bits; replaces --retention."),
    merge: str = typer.Option("auto", help="Evicting methods fold evicted entries into kept neighbours: auto (under --kv-budget the frontier's choice), none, mean, values."),
    cross_store: str = typer.Option("auto", "--cross-store", help="Encoder-decoders (Whisper): where the cross-attention cache lives. auto: the method's own (audiokv under --kv-budget keeps the encoder output once, every layer's keys and values made from it on the fly, exact at 1/(2 x layers) of the bytes); kv: per layer and head; latent: the encoder output once."),
    kernel: bool = typer.Option(False, "--kernel", help="Time the decode attention alone on random tensors of --geometry."),
    geometry: str = typer.Option("qwen2-audio-7b", help="Decoder geometry for --kernel: qwen2-audio-7b, qwen2.5-omni-7b, qwen2.5-omni-3b, qwen3-omni-30b, tiny."),
    decode_kernel: str = typer.Option("auto", help="Decode attention backend: auto, matmul, sdpa, varlen, flash-attn, padded (--kernel: every one here)."),
    prefill_chunk: Optional[int] = typer.Option(None, min=1, help="Prefill in chunks of N tokens, every layer compressed to its budget after each chunk."),
    memory: bool = typer.Option(True, help="CPU: measure peak tensor memory in one extra untimed run per method."),
    attn_implementation: Optional[str] = typer.Option(None, help="Attention of the parts audiokv leaves alone (sdpa, eager, flash_attention_2)."),
    threads: int = typer.Option(0, min=0, help="CPU threads for torch (0: 1 for small models on CPU, else one per core; --kernel: torch's default)."),
    profile: Optional[str] = typer.Option(None, help="Head profile for audiokv: a file, hf://OWNER/REPO/FILE or OWNER/REPO (default: one from profiles/)."),
    allow_profile_mismatch: bool = typer.Option(False, "--allow-profile-mismatch", help="Use a head profile measured on another checkpoint of the same architecture (refused by default)."),
    device: Device = typer.Option(Device.auto),
    dtype: DType = typer.Option(DType.auto),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per method."),
) -> None:
    """Time prefill and decoding and measure the kept KV bytes of each method on the same prompt."""
    from audiokv_cli.compression.decode_kernels import KERNEL_NAMES, select_kernel
    from audiokv_cli.compression.methods import MethodOptions, build_policy, resolve_method

    check_range("--retention", retention, 0.0, 1.0, low_open=True)
    if seconds is not None:
        check_range("--seconds", seconds, 0.0, 3600.0, low_open=True)
    memory_gb = memory_gb if memory_gb is not None else kv_budget_gb
    if memory_gb is not None and memory_gb <= 0:
        raise AudiokvError(f"--memory-gb must be positive, got {memory_gb:g}")
    storage = MethodOptions(
        kv_bits=kv_bits, kv_budget=kv_budget, merge=None if merge == "auto" else merge,
        cross_store=None if cross_store == "auto" else cross_store,
    )
    build_policy("snapkv", retention, storage)  # bad --kv-bits, --kv-budget or --merge fail before loading anything
    if decode_kernel not in KERNEL_NAMES:
        raise AudiokvError(f"unknown decode kernel {decode_kernel!r}: use {', '.join(KERNEL_NAMES)}")
    sizes = _batch_sizes(batch_sizes)
    specs = [resolve_method(name) for name in methods.split(",") if name.strip()]  # fail before loading anything
    if kernel:
        if threads:
            import torch

            torch.set_num_threads(threads)
        _bench_kernel(geometry, specs, retention, prompt_tokens or 8192, sizes, repeats, decode_kernel, device, dtype, as_json)
        return
    _bench_model(model, specs, retention, seconds, prompt_tokens, new_tokens, repeats, sizes, memory_gb,
                 decode_kernel, prefill_chunk, memory, threads, profile, device, dtype, attn_implementation, as_json,
                 storage, allow_profile_mismatch)


def _bench_model(model, specs, retention, seconds, prompt_tokens, new_tokens, repeats, sizes, kv_budget_gb,
                 decode_kernel, prefill_chunk, memory, threads, profile, device, dtype, attn_implementation,
                 as_json, options, allow_profile_mismatch=False) -> None:
    import torch

    from audiokv_cli.bench.model import bench_policies, prompt_of, streams_in_budget, synthetic_clip
    from audiokv_cli.commands.evaluate import _auto_threads
    from audiokv_cli.commands.infer import resolve_head_profile
    from audiokv_cli.compression.decode_kernels import check_kernel, select_kernel
    from audiokv_cli.compression.methods import MethodOptions
    from audiokv_cli.bench.memory import peak_host_rss_bytes

    adapter = load_model(model, device, dtype, attn_implementation=attn_implementation)
    host_peak_loading = peak_host_rss_bytes()
    check_kernel(decode_kernel, adapter.device, adapter.dtype)
    select_kernel(decode_kernel)
    torch.set_num_threads(threads or _auto_threads(adapter))
    if any(spec.uses_profile for spec in specs):
        options.head_scores, options.head_sensitivity = resolve_head_profile(adapter, profile, allow_profile_mismatch)
    if prompt_tokens:
        prepared = prompt_of(adapter, prompt_tokens, seconds)
    else:
        prepared = adapter.prepare(synthetic_clip(min(seconds or DEFAULT_SECONDS, adapter.max_audio_seconds)))
    reference = MethodOptions(head_scores=options.head_scores)  # the full cache stays the model's own
    policies = [spec.policy(1.0, reference) if spec.is_full else spec.policy(retention, options) for spec in specs]
    if prefill_chunk:
        from audiokv_cli.compression.chunked import check_chunked

        for policy in policies:
            check_chunked(policy, prefill_chunk)
    batches = tuple(size for size in sizes if size > 1 or len(sizes) > 1)
    with console.status(f"timing {', '.join(spec.label for spec in specs)} ..."):
        rows = bench_policies(adapter, prepared, policies, new_tokens, repeats, batches, memory, prefill_chunk)
    reference = next((row for row in rows if row.method == "full"), None)
    per_token = adapter.geometry.kv_bytes_per_token(adapter.dtype)
    budget = kv_budget_gb * 1e9 if kv_budget_gb else None
    records = []
    for row in rows:
        plain = reference.seconds_prefill if reference else row.seconds_prefill - row.seconds_compress
        record = {**row.__dict__, "kept_ratio": row.kept_ratio}
        record.pop("tokens_per_second")
        record.update(
            model=adapter.name,
            device=adapter.device.type,
            dtype=str(adapter.dtype).removeprefix("torch."),
            audio_seconds=round(prepared.audio_seconds, 3),
            decode_vs_full=row.ms_per_token / reference.ms_per_token if reference else None,
            prefill_overhead=row.seconds_compress / plain if plain > 0 else None,
            peak_host_rss_loading_bytes=host_peak_loading,
            decode_kernel=decode_kernel,
            prefill_chunk=prefill_chunk,
            threads=torch.get_num_threads(),
        )
        for size, rate in row.tokens_per_second.items():
            record[f"tokens_per_second_batch_{size}"] = rate
        if budget:
            record["memory_budget_bytes"] = budget
            record["streams_in_budget"] = streams_in_budget(row, budget, per_token)
        records.append(record)
    if as_json:
        _print_rows(records)
        return
    title = (
        f"{adapter.name} on {prepared.audio_seconds:.0f} s of audio, {prepared.prompt_tokens} prompt tokens, "
        f"{adapter.device.type} {str(adapter.dtype).removeprefix('torch.')}, {torch.get_num_threads()} thread(s)"
    )
    table = Table(title=title)
    columns = ["method", "kept KV", "of full", "peak prefill KV", "peak memory", "prefill s", "select % of prefill",
               "decode ms/token", "decode vs full"]
    columns += [f"tok/s batch {size}" for size in batches]
    if budget:
        columns.append(f"streams in {kv_budget_gb:g} GB")  # --memory-gb
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=column == "method")
    for row, record in zip(rows, records):
        cells = [
            row.method if row.method == "full" else f"{row.method} @ {row.retention:.3g}" + (
                f", {row.kv_bits}-bit" if row.kv_bits and row.kv_bits < 32 else ""
            ),
            f"{row.kv_bytes_kept / 2**20:.2f} MiB",
            f"{100 * row.kept_ratio:.1f} %",
            f"{row.peak_prefill_cache_bytes / 2**20:.2f} MiB",
            "-" if row.peak_memory_bytes is None else f"{row.peak_memory_bytes / 2**20:.1f} MiB",
            f"{row.seconds_prefill:.3f}",
            "-" if record["prefill_overhead"] is None else f"{100 * record['prefill_overhead']:.1f} %",
            f"{row.ms_per_token:.2f}",
            "-" if record["decode_vs_full"] is None else f"{record['decode_vs_full']:.2f}x",
        ]
        cells += [f"{row.tokens_per_second[size]:.1f}" for size in batches]
        if budget:
            cells.append(str(record["streams_in_budget"]))
        table.add_row(*cells)
    stdout.print(table)
    console.print(f"[dim]peak host RAM after loading the model: {host_peak_loading / 2**30:.2f} GiB[/]")


def _bench_kernel(geometry, specs, retention, prompt_tokens, sizes, repeats, decode_kernel, device, dtype, as_json):
    import torch

    from audiokv_cli.compression.decode_kernels import check_kernel
    from audiokv_cli.compression.methods import MethodOptions
    from audiokv_cli.bench.kernels import bench_kernels, geometry_named, synthetic_head_scores
    from audiokv_cli.models.registry import resolve_device, resolve_dtype

    shape = geometry_named(geometry)
    torch_device = resolve_device(device.value)
    torch_dtype = resolve_dtype(dtype.value, torch_device)
    check_kernel(decode_kernel, torch_device, torch_dtype)
    options = MethodOptions(head_scores=synthetic_head_scores(shape))
    policies = [spec.policy(1.0 if spec.is_full else retention, options) for spec in specs]
    kernels = None if decode_kernel == "auto" else [decode_kernel]
    rows = []
    with console.status(f"timing decode attention on {geometry} ..."), torch.no_grad():
        for size in sizes:
            rows += bench_kernels(geometry, policies, prompt_tokens, torch_device, torch_dtype, size, repeats, kernels=kernels)
    if as_json:
        _print_rows([
            {**row.__dict__, "kept_ratio": row.kept_ratio, "device": torch_device.type, "threads": torch.get_num_threads()}
            for row in rows
        ])
        return
    table = Table(title=(
        f"decode attention, {geometry} ({shape.num_query_heads} q / {shape.num_kv_heads} KV heads x {shape.head_dim}, "
        f"{shape.num_layers} layers), {prompt_tokens} prompt tokens, {torch_device.type} "
        f"{str(torch_dtype).removeprefix('torch.')}, {torch.get_num_threads()} thread(s)"
    ))
    for column in ("method", "backend", "batch", "kept KV", "ms/layer", "ms/token (all layers)", "vs dense", "tokens/s"):
        table.add_column(column, justify="left" if column in ("method", "backend") else "right", no_wrap=True)
    for row in rows:
        table.add_row(
            row.method if row.method == "full" else f"{row.method} @ {row.retention:g}",
            row.kernel,
            str(row.batch),
            f"{100 * row.kept_ratio:.1f} %",
            f"{row.ms_per_layer:.3f}",
            f"{row.ms_per_token:.2f}",
            f"{row.vs_dense:.3f}x",
            f"{row.tokens_per_second:.1f}",
        )
    stdout.print(table)
    console.print("[dim]full = dense SDPA over the whole prompt; the others read only the kept entries (auto = the backend decoding picks)[/]")
