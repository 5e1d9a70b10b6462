"""The eval progress journal: one JSON line per finished clip-cell, appended as it finishes, read back by --resume.

A line reaches the file in one `write` on a descriptor opened for appending, then fsync (files.append_whole): a kill
(even -9) leaves whole lines plus at most one cut-off last line, which the reader drops. The first line records the settings that
make rows comparable (model, data, cells, decoding), so a resume never mixes rows of different runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from audiokv_cli.errors import AudiokvError
from audiokv_cli.io.files import append_whole

JOURNAL_NAME = "rows.partial.jsonl"
FORMAT = "audiokv-eval-journal"


def row_key(row: Mapping) -> tuple:
    """(clip, method, retention, scope): one clip-cell."""
    return (row["clip"], row["method"], row["retention"], row["scope"])


class Journal:
    def __init__(self, out_dir: str | os.PathLike, settings: Mapping[str, Any], name: str = JOURNAL_NAME):
        self.path = Path(out_dir) / name
        self.settings = json.loads(json.dumps(settings))  # as it will read back
        self._started = False

    def read(self) -> dict[tuple, dict]:
        """Rows already finished by an earlier run with the same settings ({} when there is no journal)."""
        if not self.path.exists():
            return {}
        try:
            data = self.path.read_bytes()
        except OSError as error:
            raise AudiokvError(f"{self.path}: cannot read the eval journal ({error.strerror or error})") from None
        lines = data.split(b"\n")
        complete, _cut = lines[:-1], lines[-1]  # the last piece lacks its newline when a write was cut off
        records = []
        for line in complete:
            try:
                records.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise AudiokvError(f"{self.path}: damaged eval journal; remove it to start over") from None
        if not records:
            return {}
        header = records[0]
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise AudiokvError(f"{self.path}: not an audiokv eval journal; remove it to start over")
        if header.get("settings") != self.settings:
            raise AudiokvError(
                f"{self.path}: an unfinished run with other settings (model, data, methods, head profile or decoding); "
                "remove it, or run with --out elsewhere"
            )
        # Rewrite without the cut-off piece so appends continue on a line boundary.
        if _cut:
            with open(self.path, "r+b") as handle:
                handle.truncate(len(data) - len(_cut))
        self._started = True
        return {row_key(row): row for row in records[1:]}

    def append(self, row: Mapping) -> None:
        """Record one finished clip-cell. The first append of a run that does not resume replaces an old journal
        and writes the header."""
        lines = [row]
        if not self._started:
            self.remove()
            lines.insert(0, {"format": FORMAT, "settings": self.settings})
        append_whole(self.path, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in lines).encode("utf-8"))
        self._started = True

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

