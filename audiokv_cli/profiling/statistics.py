"""The head statistic: how often a head's strongest attention falls on the audio of the word being spoken.

At a decoding step aligned to word w, head (l, h) scores r_t = |TopK(attention row) ∩ span(w)| / K. A profile keeps
per head the summed hits, the number of scored steps and the summed attention mass on the audio; the score is
hits / steps. Accumulation is exact and order-free (integer hit counts, audio mass rounded to multiples of 2^-24
and summed in float64, which stays exact below 2^29), so shards merge to the bit and resumed runs match.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch

from audiokv_cli.errors import AudiokvError
from audiokv_cli.profiling.alignment import WordTiming

# Audio mass per step is rounded to this grid so float64 sums are exact whatever the order of addition.
MASS_QUANTUM = 2.0**-24
_EPSILON = 1e-9


def word_token_span(
    start: float,
    end: float,
    audio_span: tuple[int, int],
    seconds_per_token: float | None,
    audio_seconds: float,
) -> tuple[int, int]:
    """Audio-token index range [a, b) covering the word spoken from ``start`` to ``end`` seconds.

    With an exact frame rate token i covers [i * spt, (i + 1) * spt); otherwise the audio span is spread uniformly
    over the clip (the paper's map). The range is clipped to the audio span and never empty.
    """
    span_start, span_end = audio_span
    count = span_end - span_start
    if count <= 0:
        raise AudiokvError("the prompt holds no audio tokens")
    if seconds_per_token:
        first, last = start / seconds_per_token, end / seconds_per_token
    else:
        if audio_seconds <= 0:
            raise AudiokvError("cannot map word times onto audio tokens: clip length is zero")
        first, last = start / audio_seconds * count, end / audio_seconds * count
    a = min(max(math.floor(first + _EPSILON), 0), count - 1)
    b = min(max(math.ceil(last - _EPSILON), a + 1), count)
    return span_start + a, span_start + b


def hit_counts(topk_indices: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    """|TopK ∩ [start, end)| per head: ``topk_indices`` is [..., K] (padding -1 never hits); returns int64 [...]."""
    start, end = span
    return ((topk_indices >= start) & (topk_indices < end)).sum(dim=-1, dtype=torch.int64)


def hit_ratios(topk_indices: torch.Tensor, span: tuple[int, int], top_k: int) -> torch.Tensor:
    """r_t(l, h) = |TopK ∩ span| / K as float64."""
    return hit_counts(topk_indices, span).to(torch.float64) / top_k


def quantize_mass(mass: torch.Tensor) -> torch.Tensor:
    """Round attention mass to the 2^-24 grid (float64) so that sums of it are exact and associative."""
    return torch.round(mass.to(torch.float64) / MASS_QUANTUM) * MASS_QUANTUM


@dataclass
class HeadStatistics:
    """Running per-head sums for one profile: integer hit counts, scored steps, quantized audio mass."""

    hit_counts: torch.Tensor  # int64 [layers, query_heads]
    steps: torch.Tensor  # int64 [layers, query_heads]
    audio_mass: torch.Tensor  # float64 [layers, query_heads]
    top_k: int

    @classmethod
    def zeros(cls, num_layers: int, num_query_heads: int, top_k: int) -> "HeadStatistics":
        shape = (num_layers, num_query_heads)
        return cls(
            hit_counts=torch.zeros(shape, dtype=torch.int64),
            steps=torch.zeros(shape, dtype=torch.int64),
            audio_mass=torch.zeros(shape, dtype=torch.float64),
            top_k=top_k,
        )

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.steps.shape)

    def add_step(self, topk_indices: torch.Tensor, audio_mass: torch.Tensor, target: tuple[int, int]) -> None:
        """Score one decoding step: ``topk_indices`` [L, H, K], ``audio_mass`` [L, H], ``target`` token range."""
        self.hit_counts += hit_counts(topk_indices.cpu(), target)
        self.steps += 1
        self.audio_mass += quantize_mass(audio_mass.cpu())

    def add(self, other: "HeadStatistics") -> None:
        if other.top_k != self.top_k or other.shape != self.shape:
            raise AudiokvError("cannot add head statistics with different K or shapes")
        self.hit_counts += other.hit_counts
        self.steps += other.steps
        self.audio_mass += other.audio_mass

    @property
    def hits(self) -> torch.Tensor:
        """Sum of r_t over scored steps (float64)."""
        return self.hit_counts.to(torch.float64) / self.top_k

    def score(self, statistic: str) -> torch.Tensor:
        """``topk_hits``: mean r_t; ``audio_mass``: mean attention mass on the audio span. Zero where unscored."""
        numerator = self.hits if statistic == "topk_hits" else self.audio_mass
        steps = self.steps.to(torch.float64)
        return torch.where(self.steps > 0, numerator / steps.clamp(min=1), torch.zeros_like(numerator))

    @classmethod
    def from_tensors(cls, hits: torch.Tensor, steps: torch.Tensor, audio_mass: torch.Tensor, top_k: int):
        """Rebuild exact sums from a profile file's tensors (hits * K are integers by construction)."""
        counts = torch.round(hits.to(torch.float64) * top_k)
        if not torch.allclose(counts, hits.to(torch.float64) * top_k, atol=1e-6, rtol=0):
            raise AudiokvError("profile 'hits' are not multiples of 1/K; the file was not written by audiokv")
        return cls(counts.to(torch.int64), steps.to(torch.int64), quantize_mass(audio_mass), top_k)


# ------------------------------------------------------------------------------------------- token-to-word alignment

_WORD = re.compile(r"\S+")


def normalize_word(word: str) -> str:
    """Lowercase letters and digits only, so 'Hello,' in a transcript matches 'hello' from the model."""
    return "".join(ch for ch in word.lower() if ch.isalnum())


def text_words(text: str) -> list[tuple[str, int, int]]:
    """Whitespace-separated words of ``text`` with [start, end) character offsets (punctuation-only words dropped)."""
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text) if normalize_word(m.group())]


def align_tokens_to_words(
    pieces: Sequence[str], reference: Sequence[WordTiming], min_confidence: float
) -> list[WordTiming | None]:
    """For every generated token (given as the text piece it added), the reference word it spells, or None.

    The decoded words are matched to the reference words by a longest-common-subsequence alignment of their
    normalized forms; a token belongs to the decoded word that holds its first non-space character. Tokens of
    unmatched words, of words below ``min_confidence`` and pure whitespace/punctuation tokens are unaligned.
    """
    text = "".join(pieces)
    decoded = text_words(text)
    matcher = difflib.SequenceMatcher(
        a=[normalize_word(w) for w, _, _ in decoded], b=[normalize_word(w.word) for w in reference], autojunk=False
    )
    word_for_decoded: dict[int, WordTiming] = {}
    for block in matcher.get_matching_blocks():
        for offset in range(block.size):
            ref = reference[block.b + offset]
            if ref.confidence >= min_confidence:
                word_for_decoded[block.a + offset] = ref
    owner = [None] * len(text)  # character offset -> decoded word index
    for index, (_, start, end) in enumerate(decoded):
        for char in range(start, end):
            owner[char] = index
    result: list[WordTiming | None] = []
    position = 0
    for piece in pieces:
        stripped = len(piece) - len(piece.lstrip())
        first = position + stripped
        index = owner[first] if stripped < len(piece) and first < len(owner) else None
        word = word_for_decoded.get(index) if index is not None else None
        if word is not None and not normalize_word(piece):
            word = None  # a punctuation token inside a word carries no evidence about the audio
        result.append(word)
        position += len(piece)
    return result
