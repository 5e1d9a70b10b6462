"""Transcript quality metrics: Whisper text normalization, corpus WER/CER, accuracy and repetition-loop detection.

Conventions follow the audio-LM evaluations (Qwen2-Audio, lmms-eval, the Open ASR Leaderboard): Whisper's
English normalizer for English, Whisper's basic normalizer elsewhere, and corpus-level error rates
(sum of edits over all clips / sum of reference units), never the mean of per-clip rates.
Definitions are spelled out in docs/evaluation.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import jiwer

# Languages written without spaces between words: scored by CER, and whitespace carries no information there.
NO_SPACE_LANGS = frozenset({"zh", "ja", "yue", "th", "lo", "my", "km", "bo"})

# Repetition-loop thresholds (see is_degenerate and docs/evaluation.md).
LOOP_MAX_NGRAM = 32  # longest repeated unit (tokens or words) searched for
LOOP_MIN_REPEATS = 3  # the loop must cover at least this many copies of its unit...
LOOP_MIN_SPAN = 8  # ...and at least this many tokens/words in all
LIMIT_TAIL_WINDOW = 64  # at the token limit, look at this many final tokens/words
LIMIT_NGRAM = 3  # n-gram size for the repeated-n-gram share
LIMIT_MIN_UNITS = 16  # too little text to judge below this
LIMIT_REPEAT_SHARE = 0.5  # share of repeated n-grams in the tail window that marks a loop


# --------------------------------------------------------------------------------------------------- normalization


@lru_cache(maxsize=1)
def _english_normalizer():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


@lru_cache(maxsize=1)
def _basic_normalizer():
    from whisper_normalizer.basic import BasicTextNormalizer

    return BasicTextNormalizer()


def _base_lang(lang: str | None) -> str:
    # "en-US", "EN", "zh_CN" -> "en", "en", "zh"
    return re.split(r"[-_]", (lang or "en").strip().lower(), maxsplit=1)[0] or "en"


def normalize(text: str, lang: str | None = "en") -> str:
    """Whisper normalization: EnglishTextNormalizer for English, BasicTextNormalizer for any other language.

    Whitespace is collapsed to single spaces; for languages written without spaces (zh, ja, ...) it is removed.
    """
    base = _base_lang(lang)
    normalizer = _english_normalizer() if base == "en" else _basic_normalizer()
    normalized = " ".join(normalizer(text or "").split())
    if base in NO_SPACE_LANGS:
        normalized = normalized.replace(" ", "")
    return normalized


def uses_cer(lang: str | None) -> bool:
    """Whether a language is scored by character error rate (no spaces between words)."""
    return _base_lang(lang) in NO_SPACE_LANGS


# ------------------------------------------------------------------------------------------------------ error rates


@dataclass(frozen=True)
class EditCounts:
    """Levenshtein alignment counts between a reference and a hypothesis (words or characters)."""

    substitutions: int
    deletions: int
    insertions: int
    reference_length: int

    @property
    def edits(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float:
        """edits / reference length; an empty reference counts as length 1 (so 0 for an empty hypothesis)."""
        return self.edits / max(self.reference_length, 1)

    def __add__(self, other: EditCounts) -> EditCounts:
        return EditCounts(
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
            self.reference_length + other.reference_length,
        )


_ZERO = EditCounts(0, 0, 0, 0)


def word_edits(reference: str, hypothesis: str) -> EditCounts:
    """Word-level edit counts of two already-normalized strings (words are split on whitespace)."""
    ref_words = reference.split()
    hyp_words = hypothesis.split()
    # jiwer wants non-empty sides for a meaningful alignment; the empty cases are trivial anyway.
    if not ref_words or not hyp_words:
        return EditCounts(0, len(ref_words), len(hyp_words), len(ref_words))
    out = jiwer.process_words(" ".join(ref_words), " ".join(hyp_words))
    return EditCounts(out.substitutions, out.deletions, out.insertions, len(ref_words))


def char_edits(reference: str, hypothesis: str) -> EditCounts:
    """Character-level edit counts of two already-normalized strings (runs of whitespace count as one space)."""
    ref = " ".join(reference.split())
    hyp = " ".join(hypothesis.split())
    if not ref or not hyp:
        return EditCounts(0, len(ref), len(hyp), len(ref))
    out = jiwer.process_characters(ref, hyp)
    return EditCounts(out.substitutions, out.deletions, out.insertions, len(ref))


def _langs(langs: str | None | Iterable[str | None], count: int) -> list[str | None]:
    if langs is None or isinstance(langs, str):
        return [langs] * count
    langs = list(langs)
    if len(langs) != count:
        raise ValueError(f"{len(langs)} languages for {count} clips")
    return langs


def _corpus_counts(
    references: Sequence[str],
    hypotheses: Sequence[str],
    langs: str | None | Iterable[str | None],
    unit: str,
    normalized: bool,
) -> EditCounts:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    count_edits = word_edits if unit == "word" else char_edits
    total = _ZERO
    for ref, hyp, lang in zip(references, hypotheses, _langs(langs, len(references))):
        if not normalized:
            ref, hyp = normalize(ref, lang), normalize(hyp, lang)
        total = total + count_edits(ref, hyp)
    return total


def clip_wer(reference: str, hypothesis: str, lang: str | None = "en", *, normalized: bool = False) -> float:
    """Word error rate of one clip (edits / reference words; an empty reference counts as one word)."""
    return _corpus_counts([reference], [hypothesis], lang, "word", normalized).rate


def clip_cer(reference: str, hypothesis: str, lang: str | None = "en", *, normalized: bool = False) -> float:
    """Character error rate of one clip."""
    return _corpus_counts([reference], [hypothesis], lang, "char", normalized).rate


def corpus_wer(
    references: Sequence[str],
    hypotheses: Sequence[str],
    langs: str | None | Iterable[str | None] = "en",
    *,
    normalized: bool = False,
) -> float:
    """Corpus word error rate: sum of word edits over all clips / sum of reference words (a fraction, not %)."""
    return _corpus_counts(references, hypotheses, langs, "word", normalized).rate


def corpus_cer(
    references: Sequence[str],
    hypotheses: Sequence[str],
    langs: str | None | Iterable[str | None] = "en",
    *,
    normalized: bool = False,
) -> float:
    """Corpus character error rate: sum of character edits / sum of reference characters."""
    return _corpus_counts(references, hypotheses, langs, "char", normalized).rate


def accuracy(error_rate: float) -> float:
    """The paper's accuracy in percent: max(0, 100 - 100 * error rate)."""
    if math.isnan(error_rate):
        return math.nan
    return max(0.0, 100.0 - 100.0 * error_rate)


# --------------------------------------------------------------------------------------------------- degeneration

_CJK = r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"
# One unit per CJK/kana character, otherwise one unit per run of word characters; punctuation and case are dropped
# so that "The cat. The cat." and "the cat the cat" are the same loop.
_UNIT = re.compile(rf"{_CJK}|(?:(?!{_CJK})\w)+")


def text_units(text: str) -> list[str]:
    """The units the text form of is_degenerate works on: lower-cased words, and single CJK characters."""
    return _UNIT.findall(text.casefold())


def periodic_suffix_length(units: Sequence, period: int) -> int:
    """Length of the longest suffix of ``units`` in which every unit equals the unit ``period`` places earlier.

    The suffix always holds at least one copy (``period`` units, or all of a shorter sequence); a last copy cut
    short (decoding stopped mid-loop) still counts towards the length.
    """
    length = len(units)
    if period >= length:
        return length
    matched = 0
    index = length - 1
    while index - period >= 0 and units[index] == units[index - period]:
        matched += 1
        index -= 1
    return matched + period


def repeated_tail(units: Sequence, max_ngram: int = LOOP_MAX_NGRAM) -> tuple[int, int]:
    """The strongest repetition loop at the end of ``units``: (period n, periodic suffix length).

    Among periods 1..max_ngram the one whose periodic suffix holds the most full copies wins (ties: the smaller
    period). Returns (0, 0) for an empty sequence.
    """
    best, best_copies = (0, 0), 0
    for period in range(1, min(max_ngram, len(units)) + 1):
        span = periodic_suffix_length(units, period)
        if span // period > best_copies:
            best, best_copies = (period, span), span // period
    return best


def _loop_at_end(units: Sequence, max_ngram: int, min_repeats: int, min_span: int) -> bool:
    return any(
        periodic_suffix_length(units, period) >= max(min_repeats * period, min_span)
        for period in range(1, min(max_ngram, len(units)) + 1)
    )


def repeated_ngram_share(units: Sequence, n: int = LIMIT_NGRAM) -> float:
    """Share of the n-grams in ``units`` that repeat an n-gram seen earlier: 1 - distinct / total (0 if none)."""
    total = len(units) - n + 1
    if total <= 0:
        return 0.0
    distinct = len({tuple(units[i : i + n]) for i in range(total)})
    return 1.0 - distinct / total


def is_degenerate(
    output: str | Sequence[int],
    hit_token_limit: bool = False,
    *,
    strip_ids: Iterable[int] = (),
    max_ngram: int = LOOP_MAX_NGRAM,
    min_repeats: int = LOOP_MIN_REPEATS,
    min_span: int = LOOP_MIN_SPAN,
) -> bool:
    """Whether a generated output has collapsed into repetition.

    ``output`` is either the generated token ids or the decoded text (units: lower-cased words, single CJK
    characters, punctuation ignored). Trailing ids in ``strip_ids`` (EOS, padding) are removed first.
    A clip is degenerate when either holds:

    1. loop at the end: for some n in 1..max_ngram the output ends in a periodic stretch of period n covering at
       least max(min_repeats * n, min_span) units (defaults: >= 3 copies and >= 8 units; the last copy may be
       cut short). "very very good" or "no no no" are not loops; eight "ha" or four "thank you" are.
    2. stuck at the limit: ``hit_token_limit`` is true, the output has >= 16 units, and at least half of the
       3-grams in its last 64 units repeat an earlier 3-gram of that window (loops with small variations).
    """
    if isinstance(output, str):
        units: list = text_units(output)
    else:
        units = [int(token) for token in output]
        stripped = {int(token) for token in strip_ids}
        while units and units[-1] in stripped:
            units.pop()
    if _loop_at_end(units, max_ngram, min_repeats, min_span):
        return True
    if hit_token_limit and len(units) >= LIMIT_MIN_UNITS:
        return repeated_ngram_share(units[-LIMIT_TAIL_WINDOW:], LIMIT_NGRAM) >= LIMIT_REPEAT_SHARE
    return False


# ------------------------------------------------------------------------------------------------------ aggregates

REQUIRED_RECORD_KEYS = (
    "ref",
    "hyp",
    "kv_bytes_full",
    "kv_bytes_kept",
    "seconds_prefill",
    "seconds_decode",
    "degenerate",
    "lang",
)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def score_clip(record: Mapping) -> dict:
    """Per-clip scores of one record (needs ref, hyp, lang): normalized texts, WER and CER as fractions."""
    lang = record.get("lang") or "en"
    ref = normalize(record["ref"], lang)
    hyp = normalize(record["hyp"], lang)
    return {
        "ref_normalized": ref,
        "hyp_normalized": hyp,
        "wer": word_edits(ref, hyp).rate,
        "cer": char_edits(ref, hyp).rate,
    }


def aggregate(records: Sequence[Mapping]) -> dict:
    """Summary of one evaluation cell from its per-clip records.

    Each record needs the keys in REQUIRED_RECORD_KEYS. Returns a flat dict:
    clips, wer and cer (corpus-level fractions), error_metric ("cer" when every clip's language is written
    without spaces, else "wer"), error_rate (that metric), accuracy (percent, floored at 0),
    degeneration_rate (fraction of clips), mean_kv_bytes_full, mean_kv_bytes_kept, mean_kept_ratio (mean over clips
    of kept / full), mean_seconds_prefill, mean_seconds_decode; where some records are long-form rows
    (`evaluation.longform_rows`), longform_clips and real_time_factor (their seconds over their audio seconds).
    """
    if not records:
        raise ValueError("aggregate() needs at least one record")
    for position, record in enumerate(records):
        missing = [key for key in REQUIRED_RECORD_KEYS if key not in record]
        if missing:
            raise ValueError(f"record {position} lacks {', '.join(missing)}")
    words = _ZERO
    chars = _ZERO
    for record in records:
        lang = record["lang"] or "en"
        ref, hyp = normalize(record["ref"], lang), normalize(record["hyp"], lang)
        words = words + word_edits(ref, hyp)
        chars = chars + char_edits(ref, hyp)
    error_metric = "cer" if all(uses_cer(record["lang"]) for record in records) else "wer"
    error_rate = chars.rate if error_metric == "cer" else words.rate
    ratios = [
        record["kv_bytes_kept"] / record["kv_bytes_full"] for record in records if record["kv_bytes_full"]
    ]
    summary = {
        "clips": len(records),
        "wer": words.rate,
        "cer": chars.rate,
        "reference_words": words.reference_length,
        "reference_chars": chars.reference_length,
        "error_metric": error_metric,
        "error_rate": error_rate,
        "accuracy": accuracy(error_rate),
        "degeneration_rate": _mean([1.0 if record["degenerate"] else 0.0 for record in records]),
        "mean_kv_bytes_full": _mean([float(record["kv_bytes_full"]) for record in records]),
        "mean_kv_bytes_kept": _mean([float(record["kv_bytes_kept"]) for record in records]),
        "mean_kept_ratio": _mean(ratios),
        # Bytes against the 16-bit cache (what --kv-budget is a fraction of); rows from before that field: absent.
        "mean_kept_ratio_16bit": _mean([
            record["kv_bytes_kept"] / record["kv_bytes_full_16bit"] for record in records
            if record.get("kv_bytes_full_16bit")
        ]),
        "mean_seconds_prefill": _mean([float(record["seconds_prefill"]) for record in records]),
        "mean_seconds_decode": _mean([float(record["seconds_decode"]) for record in records]),
    }
    long = [record for record in records if record.get("real_time_factor") is not None]
    if long:  # long-form rows (Whisper over several windows): their real-time factor, over their audio
        summary["longform_clips"] = len(long)
        summary["real_time_factor"] = sum(float(r["seconds_total"]) for r in long) / max(
            1e-9, sum(float(r["audio_seconds"]) for r in long)
        )
    return summary
