"""Streaming text output: a transcript appears token by token and still ends as one whole line."""

from __future__ import annotations

import sys
from typing import Callable, TextIO

# Byte-level tokenizers decode half a UTF-8 character as U+FFFD; such text is held back until the character is whole.
_INCOMPLETE = "\ufffd"


class TextStream:
    """``on_token`` callback for `run_clip`: writes the newly decoded text after each token.

    The text shown is always a prefix of the final transcript (``finish`` writes the rest and the newline), so the
    streamed line is exactly what a run without streaming prints.
    """

    def __init__(self, decode: Callable[[list[int]], str], out: TextIO | None = None):
        self._decode = decode
        self._out = out
        self.shown = ""

    @property
    def out(self) -> TextIO:
        return self._out if self._out is not None else sys.stdout

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()

    def __call__(self, token_ids: list[int]) -> None:
        text = self._decode(token_ids)
        if text.startswith(self.shown) and not text.endswith(_INCOMPLETE):
            self._write(text[len(self.shown) :])
            self.shown = text

    def finish(self, final_text: str) -> None:
        """End the line with whatever of ``final_text`` is not shown yet."""
        if not final_text.startswith(self.shown):  # cannot happen with prefix-stable decoding; never print a wrong line
            self._write("\n")
            self.shown = ""
        self._write(final_text[len(self.shown) :] + "\n")
        self.shown = ""
