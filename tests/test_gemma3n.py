"""The Gemma-3n adapter on tiny random models: shared-KV layers, sliding-window layers, 188 soft tokens, no vision."""

import pytest
import torch

from audiokv_cli.io.audio import AudioError
from audiokv_cli.compression.methods import MethodOptions, build_policy
from audiokv_cli.compression.policy import CompressionSession
from audiokv_cli.models.families.gemma3n import Gemma3nAdapter
from audiokv_cli.models.registry import load_adapter
from audiokv_cli.testing.families import build_random_gemma3n
from audiokv_cli.testing.masked_dense import assert_matches_masked_dense
from tests import adapter_checks as checks

# Small enough that the prompt (about 260 tokens) outruns it and decoding moves it on.
SHORT_WINDOW = 40


@pytest.fixture(scope="module")
def adapter(family_models):
    return family_models.adapter(Gemma3nAdapter)


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    directory = build_random_gemma3n(tmp_path_factory.mktemp("tiny-gemma3n-window"), sliding_window=SHORT_WINDOW)
    return load_adapter(str(directory), device="cpu", dtype="float32")


def test_layer_kinds(adapter):
    # Six layers alternating sliding/global; the last two read the caches of layers 2 (sliding) and 3 (global).
    assert adapter.cache_sources() == [0, 1, 2, 3, 2, 3]
    assert adapter.compressed_layers() == [0, 1, 2, 3]
    assert [adapter.sliding_window(i) for i in range(6)] == [512, None, 512, None, 512, None]
    assert adapter.geometry.num_layers == 6 and adapter.geometry.num_cache_layers == 4
    assert adapter.model.model.vision_tower.__class__.__name__ == "_NoVisionTower"
    assert not any(name.startswith("model.vision_tower") for name, _ in adapter.model.named_parameters())


@pytest.mark.parametrize("seconds", [1.0, 12.0, 30.0])
def test_prompt_and_exact_audio_span(adapter, seconds):
    """Every clip is 188 soft tokens between the audio markers, after the instruction, in Gemma's chat turns."""
    prepared = adapter.prepare(checks.noise_clip(seconds))
    tokenizer = adapter.processor.tokenizer
    ids = prepared.input_ids[0].tolist()
    (start, end), = prepared.audio_spans
    assert end - start == 188 == prepared.audio_tokens
    assert ids[start - 1] == tokenizer.convert_tokens_to_ids("<start_of_audio>")
    assert ids[end] == tokenizer.convert_tokens_to_ids("<end_of_audio>")
    text = tokenizer.decode(ids[:start - 1])
    assert text.startswith("<bos><start_of_turn>user\nTranscribe the following speech segment in English:")
    assert tokenizer.decode(ids[end + 1 :]) == "\n\n<end_of_turn>\n<start_of_turn>model\n"
    assert prepared.audio_seconds == pytest.approx(seconds)


def test_free_form_prompt(adapter):
    prepared = adapter.prepare(checks.noise_clip(1.0), prompt="What is the mood?")
    assert "What is the mood?<audio_soft_token>" in prepared.prompt


def test_audio_over_30_seconds_is_refused(adapter):
    with pytest.raises(AudioError, match="limit of 30 s"):
        adapter.prepare(checks.noise_clip(31.0))


def test_sharing_layers_read_their_source_cache(adapter):
    """Only the four cache-owning layers are compressed; the sharing layers' slots are never written."""
    prepared = adapter.prepare(checks.noise_clip(2.0, seed=5))
    result = assert_matches_masked_dense(adapter, prepared, build_policy("snapkv", 0.4, checks.options(adapter)))
    assert sorted(result.keep_masks) == [0, 1, 2, 3]


def test_profile_budgets_count_sharing_layers_for_their_source(adapter):
    """A head profile has a row per decoder layer; budgets go to the cache owners, each owner's row summed with the
    rows of the layers that read its cache."""
    scores = torch.zeros(6, 4)
    scores[4, 0] = 1.0  # a sharing layer's head is the only audio-critical one: its source (layer 2) must gain
    policy = build_policy("audiokv", 0.4, MethodOptions(window=8, head_scores=scores))
    prepared = adapter.prepare(checks.noise_clip(2.0, seed=6))
    session = CompressionSession(policy, adapter, prepared)
    merged = session.policy.budget.head_scores
    assert merged.shape == (4, 4) and merged[2, 0] == 1.0 and float(merged.sum()) == 1.0
    budgets = [session.policy.budget.allocate(rank, None, session.context) for rank in range(4)]
    assert int(budgets[2][0]) == max(int(b.max()) for b in budgets)
    assert sum(int(b.sum()) for b in budgets) == 4 * 2 * session.context.per_head


@pytest.mark.parametrize("method", ["snapkv", "audiokv", "pyramidkv"])
def test_sliding_window_layers_stay_exact_as_the_window_moves(windowed, method):
    """With a 40-position window the prompt outruns it: a sliding layer keeps only entries the first generated token
    can see, drops entries as decoding moves the window (prompt and generated ones), and every step's logits equal
    the dense model's, sliding mask and evictions applied."""
    prepared = windowed.prepare(checks.noise_clip(2.0, seed=7))
    length = prepared.prompt_tokens
    result = assert_matches_masked_dense(
        windowed, prepared, build_policy(method, 0.4, checks.options(windowed)), steps=SHORT_WINDOW + 6
    )
    live = length - (SHORT_WINDOW - 1)
    for layer, keep in result.keep_masks.items():
        if windowed.sliding_window(layer):
            assert not keep[..., :live].any(), "a sliding layer kept an entry no decode step can see"
            kept = keep[..., live:].sum(-1)
            assert (kept < SHORT_WINDOW - 1).all() and (kept > 0).all()
    # Global layers choose over the whole prompt.
    assert any(keep[..., :live].any() for layer, keep in result.keep_masks.items() if not windowed.sliding_window(layer))


def test_sliding_cache_drops_what_the_window_left(windowed):
    from audiokv_cli.runtime.attention import use_attention_handler
    from audiokv_cli.runtime.decoding import decode_greedy, prefill

    prepared = windowed.prepare(checks.noise_clip(2.0, seed=8))
    session = CompressionSession(build_policy("snapkv", 0.4, checks.options(windowed)), windowed, prepared)
    steps = SHORT_WINDOW + 10
    with torch.no_grad(), use_attention_handler(windowed, session):
        logits, _ = prefill(windowed, prepared.inputs, session.cache)
        decode_greedy(windowed, session.cache, logits, steps, stop_at_eos=False)
    sliding, dense = session.cache.layers[0], session.cache.layers[1]
    newest = sliding.get_seq_length() - 1
    assert sliding.get_seq_length() == dense.get_seq_length() == prepared.prompt_tokens + steps - 1
    # Everything the sliding layer still holds is inside the last query's window; the prompt is gone entirely.
    assert int(sliding.flat_positions.numel()) == 0
    assert sliding.tail_length == SHORT_WINDOW and sliding.tail_dropped == steps - 1 - SHORT_WINDOW
    assert newest - SHORT_WINDOW < prepared.prompt_tokens + sliding.tail_dropped
    assert dense.tail_length == steps - 1 and dense.window is None


def test_chunked_prefill_is_refused(adapter):
    from audiokv_cli.compression.chunked import ChunkedSession
    from audiokv_cli.errors import AudiokvError

    prepared = adapter.prepare(checks.noise_clip(1.0))
    with pytest.raises(AudiokvError, match="share caches or attend over a sliding window"):
        ChunkedSession(build_policy("snapkv", 0.4, checks.options(adapter)), adapter, prepared, chunk=64)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_eval_cells_from_one_recorded_prefill_match_live_runs(windowed, batch_size):
    """`audiokv eval`'s path (one recorded prefill replayed into every cell, cells decoded one by one or as batch
    rows) records only the cache-owning layers and gives every cell the tokens and per-head counts of a live run,
    sliding windows included."""
    from audiokv_cli.evaluation.sweep import clip_outcomes, parse_methods, plan_cells
    from audiokv_cli.runtime.inference import run_clip

    audio = checks.noise_clip(2.0, seed=9)
    prepared = windowed.prepare(audio)
    options = MethodOptions(window=8, head_scores=checks.head_scores(windowed))
    cells = plan_cells(parse_methods("full,snapkv,adakv,audiokv"), [0.4], ["all"], options)
    steps = SHORT_WINDOW + 4
    outcomes = list(clip_outcomes(windowed, prepared, cells, steps, batch_size=batch_size))
    assert len(outcomes) == len(cells)
    for cell, outcome, _ in outcomes:
        live = run_clip(windowed, audio, cell.policy, max_new_tokens=steps)
        assert outcome.token_ids == live.token_ids, cell.key
        assert outcome.kept_per_head == live.kept_per_head, cell.key
        if cell.policy.evicts:
            assert len(outcome.kept_per_head["kept"]) == 4
