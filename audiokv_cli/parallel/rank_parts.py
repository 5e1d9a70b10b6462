"""Per-rank output parts and their exact merge: what N ranks write adds up to what one process writes.

Eval: each rank's rows (one per clip-cell) go to a JSON part; rank 0 puts them in clip order, then cell order, as a
single process orders them. Profiles: each rank's statistics go to a profile part; rank 0 adds them with `merge`
(integer counts and float64 sums on a fixed grid: exact, so the merged tensors equal a single run's bit for bit).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from audiokv_cli.parallel.ranks import Ranks
from audiokv_cli.errors import AudiokvError
from audiokv_cli.io.files import write_atomic

ROWS_STEM = "rows"


def rows_part_path(out_dir: str | Path, ranks: Ranks) -> Path:
    return Path(out_dir) / f"{ranks.part_name(ROWS_STEM)}.json"


def write_rows_part(out_dir: str | Path, ranks: Ranks, rows: Sequence[dict]) -> Path:
    return write_atomic(rows_part_path(out_dir, ranks), json.dumps(list(rows), ensure_ascii=False))


def gather_rows(out_dir: str | Path, world: int, examples, cells) -> list[dict]:
    """Every rank's rows (rank 0, after all parts are written), in single-process order; the parts are removed."""
    parts = [rows_part_path(out_dir, Ranks(rank, world)) for rank in range(world)]
    rows: list[dict] = []
    for part in parts:
        try:
            rows.extend(json.loads(part.read_text(encoding="utf-8")))
        except (OSError, ValueError) as error:
            raise AudiokvError(f"{part}: cannot read a rank's rows ({error})") from None
    clip_order = {example.id: index for index, example in enumerate(examples)}
    cell_order = {cell.key: index for index, cell in enumerate(cells)}
    rows.sort(key=lambda r: (clip_order[r["clip"]], cell_order[(r["method"], r["retention"], r["scope"])]))
    for part in parts:
        part.unlink(missing_ok=True)
    return rows


def profile_part_out(out: str | Path, ranks: Ranks) -> Path:
    """Where a rank writes its profile part (NAME.rankR-of-N.safetensors beside --out); resumable like any profile."""
    out = Path(out)
    stem = out.name[: -len(out.suffix)] if out.suffix in (".safetensors", ".json") else out.name
    return out.with_name(ranks.part_name(stem))


def merge_profile_parts(out: str | Path, world: int) -> Path:
    """Rank 0: add every rank's profile part into --out (the parts are removed)."""
    from audiokv_cli.profiling.profile_file import (
        load_profile,
        merge_profiles,
        profile_paths,
        remove_profile_files,
        save_profile,
    )

    parts = [profile_part_out(out, Ranks(rank, world)) for rank in range(world)]
    present = [part for part in parts if profile_paths(part)[0].exists()]
    loaded = [load_profile(profile_paths(part)[0]) for part in present]
    merged = loaded[0] if len(loaded) == 1 else merge_profiles(loaded, [str(profile_paths(p)[0]) for p in present])
    path = save_profile(merged, out)
    for part in present:
        remove_profile_files(part)
    return path
