"""Output files appear whole or not at all: write beside the target, then rename over it."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Outputs are meant to be shared (profiles, reports): readable by others, as a plain `open()` would make them.
FILE_MODE = 0o644


def _temp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(descriptor)
    os.chmod(temp, FILE_MODE & ~_umask())
    return Path(temp)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def stage(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` durably to a temporary file beside ``path`` and return it; the caller renames it into place."""
    temp = _temp_beside(Path(path))
    try:
        with open(temp, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Replace ``path`` with ``data`` so that readers (and a kill mid-write) never see a partial file."""
    path = Path(path)
    temp = stage(path, data)
    try:
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """For writers that need a file name (matplotlib, safetensors): yields a temporary path that replaces ``path``
    when the block succeeds and is removed when it fails."""
    path = Path(path)
    temp = _temp_beside(path)
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
