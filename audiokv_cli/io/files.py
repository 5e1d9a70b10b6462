"""Output files appear whole or not at all: write beside the target, then rename over it.

A failure (full disk, no permission, a file where a folder should be) is an OutputError, one line for the user, and
leaves no temporary file behind and every earlier output as it was.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from audiokv_cli.errors import AudiokvError

# Outputs are meant to be shared (profiles, reports): readable by others, as a plain `open()` would make them.
FILE_MODE = 0o644


class OutputError(AudiokvError):
    """An output file cannot be written."""


def _output_error(path: Path, error: OSError) -> OutputError:
    return OutputError(f"{path}: cannot write ({error.strerror or error})")


def _temp_beside(path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    except OSError as error:
        raise _output_error(path, error) from None
    os.close(descriptor)
    os.chmod(temp, FILE_MODE & ~_umask())
    return Path(temp)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _write(handle, data: bytes) -> None:
    """The one place bytes reach the disk (tests make it fail as a full disk would)."""
    handle.write(data)
    handle.flush()
    os.fsync(handle.fileno())


def stage(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` durably to a temporary file beside ``path`` and return it; the caller renames it into place."""
    path = Path(path)
    temp = _temp_beside(path)
    try:
        with open(temp, "wb") as handle:
            _write(handle, data.encode("utf-8") if isinstance(data, str) else data)
    except BaseException as error:
        temp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _output_error(path, error) from None
        raise
    return temp


def _replace(temp: Path, path: Path) -> None:
    try:
        os.replace(temp, path)
    except OSError as error:  # e.g. the target is a directory
        raise _output_error(path, error) from None


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Replace ``path`` with ``data`` so that readers (and a kill mid-write) never see a partial file."""
    path = Path(path)
    temp = stage(path, data)
    try:
        _replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def write_together(files: Mapping[str | os.PathLike, bytes | str]) -> list[Path]:
    """Files that belong together (a profile and its twin, a report's tables): every one is staged before any is
    renamed, so a failure while writing leaves all earlier files as they were."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            staged.append((stage(path, data), Path(path)))
        for temp, path in staged:
            _replace(temp, path)
    finally:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)
    return [path for _, path in staged]


def append_whole(path: str | os.PathLike, data: bytes) -> None:
    """Append ``data`` (whole lines) in one write; a failure puts the file back as it was (or removes it, if this
    call created it), so a log never ends in half a record because of an error."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
    except OSError as error:
        raise _output_error(path, error) from None
    size = os.fstat(descriptor).st_size
    try:
        with open(descriptor, "ab", buffering=0) as handle:
            _write(handle, data)
    except BaseException as error:
        if existed:
            os.truncate(path, size)
        else:
            path.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _output_error(path, error) from None
        raise


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """For writers that need a file name (matplotlib, safetensors): yields a temporary path that replaces ``path``
    when the block succeeds and is removed when it fails."""
    path = Path(path)
    temp = _temp_beside(path)
    try:
        yield temp
        _replace(temp, path)
    except OSError as error:
        raise _output_error(path, error) from None
    finally:
        temp.unlink(missing_ok=True)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in blocks (what identifies a profile or a recording whatever its name)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
