import math
import random

import pytest

from audiokv_cli.evaluation.metrics import (
    accuracy,
    aggregate,
    char_edits,
    clip_cer,
    clip_wer,
    corpus_cer,
    corpus_wer,
    is_degenerate,
    normalize,
    periodic_suffix_length,
    repeated_ngram_share,
    repeated_tail,
    score_clip,
    text_units,
    word_edits,
)


def naive_edit_distance(ref: list, hyp: list) -> int:
    """Plain Levenshtein distance by dynamic programming, the reference for the jiwer-backed counts."""
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        current = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h))
        previous = current
    return previous[-1]


# ------------------------------------------------------------------------------------------------ normalization


def test_english_normalizer_follows_whisper():
    # Whisper's English normalizer spells out titles, expands the 's contraction and drops punctuation.
    assert normalize("Mr. Smith's 2 dogs!") == "mister smith is 2 dogs"
    # Numbers and currency are standardized, British spellings mapped to American ones.
    assert normalize("twenty-one dollars") == "$21"
    assert normalize("The COLOUR, please.") == "the color please"
    assert normalize("  Hello,\n   World!  ") == "hello world"


def test_other_languages_use_basic_normalizer():
    assert normalize("Très bien, Mr. Smith!", lang="fr") == "très bien mr smith"
    assert normalize("Guten Tag, Herr Müller.", lang="de-DE") == "guten tag herr müller"
    # Languages without word spacing lose the spaces left where punctuation was.
    assert normalize("你好，世界！", lang="zh") == "你好世界"
    assert normalize("", lang="en") == ""


# -------------------------------------------------------------------------------------------------- error rates


def test_word_edits_match_naive_levenshtein():
    rng = random.Random(0)
    vocabulary = ["a", "b", "c", "d", "e"]
    for _ in range(200):
        ref = [rng.choice(vocabulary) for _ in range(rng.randint(0, 8))]
        hyp = [rng.choice(vocabulary) for _ in range(rng.randint(0, 8))]
        counts = word_edits(" ".join(ref), " ".join(hyp))
        assert counts.edits == naive_edit_distance(ref, hyp)
        assert counts.reference_length == len(ref)


def test_char_edits_match_naive_levenshtein():
    rng = random.Random(1)
    for _ in range(100):
        ref = "".join(rng.choice("天气很好不") for _ in range(rng.randint(1, 8)))
        hyp = "".join(rng.choice("天气很好不") for _ in range(rng.randint(1, 8)))
        assert char_edits(ref, hyp).edits == naive_edit_distance(list(ref), list(hyp))


def test_corpus_wer_is_total_edits_over_total_words_not_mean_of_clips():
    refs = ["hello", "the cat sat on the mat with a hat"]
    hyps = ["yellow", "the cat sat on the mat with a hat"]
    per_clip = [clip_wer(ref, hyp) for ref, hyp in zip(refs, hyps)]
    assert per_clip == [1.0, 0.0]
    # 1 edit over 1 + 9 reference words; the mean of clip WERs would be 0.5.
    assert corpus_wer(refs, hyps) == pytest.approx(0.1)
    assert sum(per_clip) / len(per_clip) == pytest.approx(0.5)


def test_wer_counts_after_normalization():
    # Casing and punctuation are not errors; a substitution and a deletion are.
    assert clip_wer("Hello, World! How are you?", "hello world how are you") == 0.0
    assert clip_wer("the quick brown fox", "the quack fox") == pytest.approx(2 / 4)
    assert clip_wer("a b", "a b c d e") == pytest.approx(3 / 2)  # insertions can push WER above 1


def test_empty_references_and_hypotheses():
    assert clip_wer("", "") == 0.0
    assert clip_wer("", "two words") == 2.0  # an empty reference counts as one word
    assert clip_wer("two words", "") == 1.0
    assert corpus_wer(["", "a b"], ["x", "a b"]) == pytest.approx(1 / 2)
    assert corpus_wer(["!!"], [""]) == 0.0  # normalizes to empty on both sides
    assert clip_cer("", "", lang="zh") == 0.0


def test_cer_on_chinese():
    # One substituted character out of six; punctuation is dropped before scoring.
    assert clip_cer("今天天气很好。", "今天天气不好", lang="zh") == pytest.approx(1 / 6)
    refs = ["今天天气很好", "我爱北京"]
    hyps = ["今天天气不好", "我爱北京天安门"]
    # (1 substitution + 3 insertions) / (6 + 4) characters
    assert corpus_cer(refs, hyps, "zh") == pytest.approx(4 / 10)
    assert corpus_cer(refs, hyps, ["zh", "zh"]) == pytest.approx(4 / 10)


def test_cer_on_spaced_language_counts_single_spaces():
    # "ab cd" vs "ab cx": one substitution over 5 characters (the space counts once).
    assert clip_cer("ab   cd", "ab cx", lang="fr") == pytest.approx(1 / 5)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        corpus_wer(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        corpus_wer(["a", "b"], ["a", "b"], langs=["en"])


def test_accuracy_is_floored_at_zero():
    assert accuracy(0.0) == 100.0
    assert accuracy(0.05) == pytest.approx(95.0)
    assert accuracy(1.3) == 0.0
    assert math.isnan(accuracy(math.nan))


# -------------------------------------------------------------------------------------------------- degeneration


@pytest.mark.parametrize(
    "text",
    [
        "this is very very good",
        "no no no I said no",
        "no no no",
        "he said that that is fine",
        "Stuff it into you, his belly counselled him. After early nightfall the yellow lamps would light up.",
        "",
    ],
)
def test_natural_text_is_not_degenerate(text):
    assert not is_degenerate(text)
    assert not is_degenerate(text, hit_token_limit=True)


@pytest.mark.parametrize(
    "text",
    [
        "ha ha ha ha ha ha ha ha",
        "I would like to thank you thank you thank you thank you",
        # a sentence looping three times, the last copy cut off by the token limit
        "the cat sat on the mat. The cat sat on the mat. The cat sat on the mat. The cat",
        "我我我我我我我我我",
        "今天天气很好今天天气很好今天天气很好",
    ],
)
def test_repetition_loops_are_degenerate(text):
    assert is_degenerate(text)


def test_loop_must_be_at_the_end():
    looped = "ha ha ha ha ha ha ha ha"
    assert is_degenerate(looped)
    assert not is_degenerate(looped + " and then she left the room quietly")


def test_thresholds_on_token_ids():
    assert not is_degenerate([7] * 7)  # 7 copies of a 1-token unit: span below 8
    assert is_degenerate([7] * 8)
    assert not is_degenerate([1, 2] * 3)  # 3 copies but only 6 tokens
    assert is_degenerate([1, 2] * 4)
    assert not is_degenerate([1, 2, 3] * 2 + [1, 2])  # 2.67 copies
    assert is_degenerate([1, 2, 3] * 3)
    assert not is_degenerate(list(range(100)))


def test_trailing_eos_is_stripped_from_token_ids():
    eos = 151645
    ids = [9, 8] + [4, 5, 6] * 3 + [eos]
    assert not is_degenerate(ids)
    assert is_degenerate(ids, strip_ids=[eos])


def test_noisy_loop_is_degenerate_only_at_the_token_limit():
    # "i want to go to the X" with a changing X: never exactly periodic, but mostly repeated trigrams.
    places = ["park", "shop", "sea", "park", "town", "sea", "shop", "park", "lake", "town"]
    text = " ".join(f"i want to go to the {place}" for place in places)
    assert repeated_ngram_share(text_units(text)[-64:]) >= 0.5
    assert not is_degenerate(text, hit_token_limit=False)
    assert is_degenerate(text, hit_token_limit=True)


def test_periodic_suffix_helpers():
    assert periodic_suffix_length([1, 2, 3, 1, 2, 3, 1], 3) == 7
    assert periodic_suffix_length([5, 1, 1, 1], 1) == 3
    assert periodic_suffix_length([1, 2], 5) == 2
    assert repeated_tail([9, 1, 2, 1, 2, 1, 2]) == (2, 6)
    assert repeated_tail([]) == (0, 0)
    assert text_units("The cat. THE cat, 你好!") == ["the", "cat", "the", "cat", "你", "好"]


# ---------------------------------------------------------------------------------------------------- aggregates


def record(ref, hyp, *, lang="en", full=1000, kept=400, prefill=0.5, decode=1.5, degenerate=False):
    return {
        "ref": ref,
        "hyp": hyp,
        "lang": lang,
        "kv_bytes_full": full,
        "kv_bytes_kept": kept,
        "seconds_prefill": prefill,
        "seconds_decode": decode,
        "degenerate": degenerate,
    }


def test_aggregate_english_cell():
    records = [
        record("Hello.", "yellow", kept=400, prefill=1.0, decode=2.0, degenerate=True),
        record("the cat sat on the mat with a hat", "the cat sat on the mat with a hat", full=2000, kept=1000),
    ]
    summary = aggregate(records)
    assert summary["clips"] == 2
    assert summary["wer"] == pytest.approx(0.1)
    assert summary["error_metric"] == "wer"
    assert summary["error_rate"] == pytest.approx(0.1)
    assert summary["accuracy"] == pytest.approx(90.0)
    assert summary["degeneration_rate"] == pytest.approx(0.5)
    assert summary["mean_kv_bytes_kept"] == pytest.approx(700.0)
    assert summary["mean_kv_bytes_full"] == pytest.approx(1500.0)
    assert summary["mean_kept_ratio"] == pytest.approx((0.4 + 0.5) / 2)
    assert summary["mean_seconds_prefill"] == pytest.approx(0.75)
    assert summary["mean_seconds_decode"] == pytest.approx(1.75)
    assert summary["reference_words"] == 10


def test_aggregate_chinese_cell_uses_cer():
    records = [record("今天天气很好", "今天天气不好", lang="zh"), record("我爱北京", "我爱北京", lang="zh")]
    summary = aggregate(records)
    assert summary["error_metric"] == "cer"
    assert summary["cer"] == pytest.approx(1 / 10)
    assert summary["accuracy"] == pytest.approx(90.0)


def test_aggregate_rejects_incomplete_records():
    with pytest.raises(ValueError, match="kv_bytes_kept"):
        aggregate([{k: v for k, v in record("a", "a").items() if k != "kv_bytes_kept"}])
    with pytest.raises(ValueError):
        aggregate([])


def test_score_clip():
    scores = score_clip({"ref": "Hello, World!", "hyp": "hello word", "lang": "en"})
    assert scores["ref_normalized"] == "hello world"
    assert scores["hyp_normalized"] == "hello word"
    assert scores["wer"] == 0.5
    assert scores["cer"] == pytest.approx(1 / 11)  # one deletion over 11 characters, the space included
