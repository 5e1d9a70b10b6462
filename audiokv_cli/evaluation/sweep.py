"""The evaluation sweep: every clip through every (method, retention, scope) cell, with one prefill per clip.

Compression happens after each layer's full attention, so the hidden states of a prefill, and therefore the dense
keys/values of every layer and the first-token logits, do not depend on the policy. The sweep runs that prefill once
per clip with a recording handler, precomputes the raw scores of every scorer the cells use, and then, for each
cell, fills a fresh cache from the record, compresses it exactly as a live CompressionSession would, and decodes.
The result is token-for-token what `inference.run_clip` gives for the same policy (tests/test_eval_sweep.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from audiokv_cli import runtime
from audiokv_cli.compression.methods import MethodOptions, MethodSpec, resolve_method
from audiokv_cli.compression.policy import CompressionPolicy, CompressionSession
from audiokv_cli.compression.selection import SCOPES
from audiokv_cli.errors import AudiokvError
from audiokv_cli.evaluation.cell_batch import CellOutcome, run_cells_batched, run_cells_replayed
from audiokv_cli.evaluation.metrics import aggregate, is_degenerate, score_clip
from audiokv_cli.runtime.inference import full_bytes_16bit
from audiokv_cli.runtime.runner import PrefillRecord, record_prefill

def parse_methods(text: str) -> list[MethodSpec]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise AudiokvError("--methods is empty; name at least one method")
    specs: list[MethodSpec] = []
    for name in names:
        spec = resolve_method(name)
        if spec.label in [s.label for s in specs]:
            raise AudiokvError(f"method {name!r} is listed twice in --methods")
        specs.append(spec)
    return specs


def parse_fractions(text: str, option: str) -> list[float]:
    """``0.6,0.4`` -> [0.6, 0.4]: distinct values in (0, 1], largest first (``option`` names them in errors)."""
    values: list[float] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise AudiokvError(f"{option}: {part!r} is not a number") from None
        if not 0.0 < value <= 1.0:
            raise AudiokvError(f"{option} values must be in (0, 1], got {part}")
        if value not in values:
            values.append(value)
    return sorted(values, reverse=True)


def parse_retentions(text: str) -> list[float]:
    """``0.6,0.4`` -> [0.6, 0.4]; ``none``: no retention cells (byte-budget cells and the full cache only)."""
    if text.strip() == "none":
        return []
    values = parse_fractions(text, "--retention")
    if not values:
        raise AudiokvError("--retention is empty; give at least one value in (0, 1]")
    return values


def parse_bits(text: str, option: str) -> list[int | None]:
    """``auto,16,8,4,2`` -> [None, 16, 8, 4, 2] (auto: the model's dtype, or under a byte budget the frontier's)."""
    from audiokv_cli.compression.quantization import BITS

    values: list[int | None] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part == "auto":
            value = None
        elif part.isdigit() and int(part) in BITS:
            value = int(part)
        else:
            raise AudiokvError(f"{option}: {part!r} is not one of auto, {', '.join(map(str, BITS))}")
        if value not in values:
            values.append(value)
    if not values:
        raise AudiokvError(f"{option} is empty; give auto or bits ({', '.join(map(str, BITS))})")
    return values


def parse_merges(text: str) -> list[str | None]:
    """``auto,none,mean`` -> [None, "none", "mean"] (auto: dropped, or under a byte budget the frontier's choice)."""
    from audiokv_cli.compression.merging import MERGE_MODES

    modes: list[str | None] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part != "auto" and part not in MERGE_MODES:
            raise AudiokvError(f"--merge: unknown mode {part!r}; choose from auto, {', '.join(MERGE_MODES)}")
        mode = None if part == "auto" else part
        if mode not in modes:
            modes.append(mode)
    return modes or [None]


def parse_budgets(text: str | None) -> list[float]:
    """``--kv-budget 0.5,0.125`` -> [0.5, 0.125] (fractions of the 16-bit cache, largest first)."""
    return parse_fractions(text, "--kv-budget") if text else []


def parse_scopes(text: str) -> list[str]:
    scopes: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part not in SCOPES:
            raise AudiokvError(f"--scope: unknown scope {part!r}; choose from {', '.join(SCOPES)}")
        if part not in scopes:
            scopes.append(part)
    if not scopes:
        raise AudiokvError(f"--scope is empty; choose from {', '.join(SCOPES)}")
    return scopes


# --------------------------------------------------------------------------------------------------------- cells


@dataclass
class Cell:
    """One (method, retention, scope) combination and its policy. The full cache has retention 1 and scope None
    (it applies to every scope)."""

    method: str
    retention: float
    scope: str | None
    policy: CompressionPolicy

    @property
    def key(self) -> tuple[str, float, str | None]:
        return (self.method, self.retention, self.scope)


def bits_label(bits: int | None) -> str:
    return "" if bits is None else f"{bits}bit"


def cell_label(base: str, merge: str | None = None, bits: int | None = None, budget: bool = False) -> str:
    """``audiokv``, ``audiokv:merge``, ``audiokv:drop@budget``, ``audiokv@4bit``, ``stride:merge@budget``,
    ``audiokv@budget-2bit`` (no merge suffix: auto, i.e. dropped, or under a budget the frontier's choice)."""
    if merge is None:
        suffix = ""
    elif merge == "none":
        suffix = ":drop" if budget else ""
    else:
        suffix = ":merge" if merge == "mean" else f":merge-{merge}"
    label = base + suffix
    if budget:
        return label + "@budget" + (f"-{bits_label(bits)}" if bits else "")
    return label + (f"@{bits_label(bits)}" if bits else "")


def plan_cells(
    specs: Sequence[MethodSpec],
    retentions: Sequence[float],
    scopes: Sequence[str],
    options: MethodOptions,
    kv_bits: Sequence[int | None] = (None,),
    kv_budgets: Sequence[float] = (),
    budget_bits: Sequence[int | None] = (None,),
    merges: Sequence[str | None] = (None,),
) -> list[Cell]:
    """Cells in report order: the full cache once, then each method x scope x merge x bits x retention (high to
    low), then each method x scope x merge x byte budget x bits.

    A cell with stored bits is labelled ``METHOD@4bit``, one that merges evicted entries ``METHOD:merge`` (or
    ``:merge-values``). A byte-budget cell is labelled ``METHOD@budget`` (bits from the frontier table) or
    ``METHOD@budget-4bit`` and its ``retention`` is the budget: the retention it runs at depends on the prompt and is
    reported per row (``retention_run``). Quantization alone is ``full@4bit`` (every entry kept; its bytes are what
    the bits cost), so the full cache gets no budget cells.
    Builds every policy, so bad parameters fail here; methods with profile budgets need options.head_scores.
    """
    cells: list[Cell] = []
    full_options = dataclasses.replace(options, scope="all")
    for spec in specs:
        if not spec.keeps_all:
            continue
        for bits in kv_bits:
            if not spec.is_full and bits not in (None, 4, 2):
                continue  # transformers' QuantizedCache: 4 or 2 bits (auto: 4)
            policy = spec.policy(1.0, dataclasses.replace(full_options, kv_bits=bits))
            policy.name = cell_label(spec.label, bits=bits if spec.is_full else policy.kv_bits)
            if all(cell.method != policy.name for cell in cells):  # auto and 4 are one QuantizedCache cell
                cells.append(Cell(policy.name, 1.0, None, policy))
    for spec in specs:
        if spec.keeps_all:
            continue
        for scope in scopes:
            for merge in merges:
                for bits in kv_bits:
                    scoped = dataclasses.replace(options, scope=scope, kv_bits=bits, merge=merge)
                    for retention in retentions:
                        policy = spec.policy(retention, scoped)
                        policy.name = cell_label(spec.label or policy.name, merge, bits)
                        cells.append(Cell(policy.name, retention, scope, policy))
    for spec in specs:
        if spec.keeps_all:
            continue  # quantization alone is full@BITS: its bytes are what the bits give
        for scope in scopes:
            for merge in merges:
                for budget in kv_budgets:
                    for bits in budget_bits:
                        scoped = dataclasses.replace(options, scope=scope, kv_bits=bits, kv_budget=budget, merge=merge)
                        policy = spec.policy(1.0, scoped)
                        policy.name = cell_label(spec.label or policy.name, merge, bits, budget=True)
                        cells.append(Cell(policy.name, budget, scope, policy))
    return cells


# ----------------------------------------------------------------------------------------------- shared prefill


def run_cell(adapter, prepared, record: PrefillRecord, policy: CompressionPolicy, max_new_tokens: int) -> CellOutcome:
    """Compress a fresh cache filled from ``record`` as ``policy`` says, then decode greedily."""
    session = CompressionSession(policy, adapter, prepared)
    output = runtime.run(adapter, session, None, max_new_tokens, record=record)
    tokens = output.tokens[0]
    per_head = session.summary() if policy.evicts else {}
    return CellOutcome(tokens, len(tokens) >= max_new_tokens, output.kept_bytes[0], output.seconds_compress,
                       output.seconds_decode, per_head, session.policy)


def run_live(adapter, prepared, policy: CompressionPolicy, max_new_tokens: int) -> tuple[CellOutcome, float]:
    """Prefill and decode ``prepared`` under ``policy`` (a cell whose cache cannot be filled from a record); the
    outcome and the prefill's seconds."""
    session = CompressionSession(policy, adapter, prepared)
    output = runtime.run(adapter, session, prepared.inputs, max_new_tokens)
    tokens = output.tokens[0]
    outcome = CellOutcome(tokens, len(tokens) >= max_new_tokens, output.kept_bytes[0], 0.0, output.seconds_decode,
                          {}, session.policy)
    return outcome, output.seconds_prefill


# --------------------------------------------------------------------------------------------------------- sweep


@dataclass
class SweepResult:
    clips: list[dict]  # one row per (clip, cell)
    summary: list[dict]  # one row per cell: method, retention, scope + metrics.aggregate()


def run_sweep(
    adapter,
    examples: Sequence,
    cells: Sequence[Cell],
    max_new_tokens: int = 256,
    *,
    load_audio: Callable | None = None,
    on_step: Callable[[str, Cell], None] | None = None,
    on_row: Callable[[dict], None] | None = None,
    done: Mapping[tuple, dict] | None = None,
    batch_size: int | None = None,
) -> SweepResult:
    """Evaluate every cell on every example (evaluation.datasets.Example) with one prefill per clip.

    ``on_step(clip_id, cell)`` is called after each decoded cell (progress display), ``on_row(row)`` with each new
    row (the resume journal). ``done`` maps (clip, method, retention, scope) to rows of an earlier run, which are
    taken as they are (a clip with every cell done is not even prefilled). ``batch_size`` cells of a clip decode
    together (see clip_outcomes); the tokens are those of one-at-a-time runs. Rows are in clip order, then cell order;
    numbers other than the ``seconds_*`` fields are deterministic for the same inputs.
    """
    done = done or {}
    if load_audio is None:
        load_audio = clip_loader(adapter)
    full_bytes_per_token = adapter.geometry.kv_bytes_per_token(adapter.dtype)
    rows: list[dict] = []
    for example in examples:
        todo = [cell for cell in cells if (example.id, *cell.key) not in done]
        rows.extend(done[(example.id, *cell.key)] for cell in cells if (example.id, *cell.key) in done)
        if not todo:
            continue
        prepared = adapter.prepare(load_audio(example.audio_path), None)
        kv_bytes_full = prepared.compressed_length * full_bytes_per_token
        kv_bytes_16bit = full_bytes_16bit(adapter, prepared)
        for cell, outcome, seconds_prefill in clip_outcomes(adapter, prepared, todo, max_new_tokens, batch_size):
            resolved = outcome.policy or cell.policy
            row = scored_row(example, cell, adapter.decode(outcome.token_ids))
            row.update(
                {
                    "degenerate": is_degenerate(
                        outcome.token_ids, outcome.hit_token_limit, strip_ids=adapter.eos_token_ids
                    ),
                    "hit_token_limit": outcome.hit_token_limit,
                    "generated_tokens": len(outcome.token_ids),
                    "audio_seconds": round(prepared.audio_seconds, 3),
                    "prompt_tokens": prepared.prompt_tokens,
                    "audio_tokens": prepared.audio_tokens,
                    **byte_fields(kv_bytes_full, outcome.kv_bytes_kept, kv_bytes_16bit),
                    "kv_bits": resolved.stored_bits(adapter.dtype),
                    "kv_budget": resolved.kv_budget,
                    "merge": resolved.merge_mode,
                    "cross_store": resolved.cross_store,
                    "retention_run": resolved.retention,
                    "seconds_prefill": seconds_prefill,
                    "seconds_compress": outcome.seconds_compress,
                    "seconds_decode": outcome.seconds_decode,
                }
            )
            rows.append(row)
            if on_row is not None:
                on_row(row)
            if on_step is not None:
                on_step(example.id, cell)
    cell_order = {cell.key: index for index, cell in enumerate(cells)}
    clip_order = {example.id: index for index, example in enumerate(examples)}
    rows.sort(key=lambda row: (clip_order[row["clip"]], cell_order[(row["method"], row["retention"], row["scope"])]))
    return SweepResult(rows, summarize(cells, rows))


def scored_row(example, cell: Cell, hyp: str) -> dict:
    """The first fields of every eval row: the clip, the cell, the texts and their error counts."""
    row = {
        "clip": example.id,
        "lang": example.lang,
        "method": cell.method,
        "policy": cell.policy.name,
        "retention": cell.retention,
        "scope": cell.scope,
        "ref": example.text,
        "hyp": hyp,
    }
    row.update(score_clip(row))
    return row


def byte_fields(full: int, kept: int, full_16bit: int) -> dict:
    """An eval row's bytes: kept against the cache in the model's dtype and against the 16-bit cache."""
    return {
        "kv_bytes_full": full,
        "kv_bytes_kept": kept,
        "kept_ratio": kept / full if full else 1.0,
        "kv_bytes_full_16bit": full_16bit,
        "kept_ratio_16bit": kept / full_16bit if full_16bit else 1.0,
    }


def clip_outcomes(adapter, prepared, cells: Sequence[Cell], max_new_tokens: int, batch_size: int | None = None):
    """(cell, CellOutcome, prefill seconds) for every cell of one clip, in cell order.

    A decoder-only model is prefilled once and its recorded cache replayed per cell, ``batch_size`` cells decoded
    together as batch rows (default 1). An encoder-decoder's cells are decoded together, ``batch_size`` rows at a
    time (default all; evaluation.cell_batch): its prompt is a few tokens, so replaying buys nothing.
    """

    policies = [cell.policy for cell in cells]
    if adapter.compressed_attention == "cross":
        size = batch_size or len(cells)
        for start in range(0, len(cells), size):
            outcomes, seconds_prefill = run_cells_batched(
                adapter, prepared, policies[start : start + size], max_new_tokens
            )
            yield from ((cell, outcome, seconds_prefill) for cell, outcome in zip(cells[start : start + size], outcomes))
        return
    live = [cell for cell in cells if cell.policy.hf_cache is not None]
    for cell in live:  # transformers' own cache: a live run, no recorded prefill to replay into it
        yield cell, *run_live(adapter, prepared, cell.policy, max_new_tokens)
    cells = [cell for cell in cells if cell.policy.hf_cache is None]
    policies = [cell.policy for cell in cells]
    if not cells:
        return
    record = record_prefill(adapter, prepared, policies)
    size = batch_size or 1
    if size == 1:
        for cell in cells:
            yield cell, run_cell(adapter, prepared, record, cell.policy, max_new_tokens), record.seconds
        return
    for start in range(0, len(cells), size):
        outcomes = run_cells_replayed(adapter, prepared, record, policies[start : start + size], max_new_tokens)
        yield from ((cell, outcome, record.seconds) for cell, outcome in zip(cells[start : start + size], outcomes))


def summarize(cells: Sequence[Cell], rows: Sequence[dict]) -> list[dict]:
    """One row per cell: its key plus metrics.aggregate() over that cell's clips."""
    by_cell: dict[tuple, list[dict]] = {cell.key: [] for cell in cells}
    for row in rows:
        by_cell[(row["method"], row["retention"], row["scope"])].append(row)
    return [
        {"method": cell.method, "retention": cell.retention, "scope": cell.scope, **aggregate(by_cell[cell.key])}
        for cell in cells
    ]


def clip_loader(adapter) -> Callable:
    """Read a clip, refusing one longer than the model takes (it would be cut, and its reference would not fit)."""
    from audiokv_cli.io.audio import load_audio

    return lambda path: load_audio(path, max_seconds=adapter.max_audio_seconds)


# ------------------------------------------------------------------------------------------- several processes


@dataclass(frozen=True)
class ModelSource:
    """How a worker process loads the same model as the parent."""

    name: str
    device: str = "cpu"
    dtype: str = "float32"
    trust_remote_code: bool = False
    device_map: str | None = None


def _sweep_worker(
    source: ModelSource, examples, cells, max_new_tokens: int, progress, done=None, batch_size=None
) -> list[dict]:
    import transformers

    from audiokv_cli.models.registry import load_adapter

    # The parent shows the progress; library bars and advice from each worker would interleave with it.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # One thread per process: the processes share the cores instead of the threads of one process.
    torch.set_num_threads(1)
    adapter = load_adapter(
        source.name, source.device, source.dtype, source.trust_remote_code, device_map=source.device_map
    )
    # Each new row goes to the parent as it finishes: progress display and the resume journal.
    on_row = progress.put if progress else None
    return run_sweep(adapter, examples, cells, max_new_tokens, on_row=on_row, done=done, batch_size=batch_size).clips


def run_sweep_parallel(
    source: ModelSource,
    examples: Sequence,
    cells: Sequence[Cell],
    max_new_tokens: int,
    workers: int,
    on_step: Callable[[str, Cell], None] | None = None,
    on_row: Callable[[dict], None] | None = None,
    done: Mapping[tuple, dict] | None = None,
    batch_size: int | None = None,
) -> SweepResult:
    """run_sweep split over ``workers`` processes (clips dealt round-robin); same rows, same order, same numbers."""
    import multiprocessing
    import queue as queue_module
    from concurrent.futures import ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools in an unknown state
    shards = [list(examples[index::workers]) for index in range(workers)]
    shards = [shard for shard in shards if shard]
    cell_by_key = {cell.key: cell for cell in cells}
    with context.Manager() as manager, ProcessPoolExecutor(len(shards), mp_context=context) as pool:
        progress = manager.Queue() if on_step or on_row else None
        futures = [
            pool.submit(_sweep_worker, source, shard, cells, max_new_tokens, progress, done, batch_size)
            for shard in shards
        ]
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=0.2)
            while progress is not None:
                try:
                    row = progress.get_nowait()
                except queue_module.Empty:
                    break
                if on_row is not None:
                    on_row(row)
                if on_step is not None:
                    on_step(row["clip"], cell_by_key[(row["method"], row["retention"], row["scope"])])
        rows = [row for future in futures for row in future.result()]
    clip_order = {example.id: index for index, example in enumerate(examples)}
    cell_order = {key: index for index, key in enumerate(cell_by_key)}
    rows.sort(key=lambda row: (clip_order[row["clip"]], cell_order[(row["method"], row["retention"], row["scope"])]))
    return SweepResult(rows, summarize(cells, rows))
