"""Chunked prefill: same answer as one-shot where nothing is evicted before the end, bounded cache otherwise."""

import numpy as np
import pytest
import torch

from audiokv_cli.runtime.attention import use_attention_handler
from audiokv_cli.bench.model import prompt_of
from audiokv_cli.compression.chunked import ChunkedSession, chunked_prefill
from audiokv_cli.compression.methods import MethodOptions, build_policy
from audiokv_cli.compression.policy import CompressionSession
from audiokv_cli.runtime.decoding import decode_greedy, prefill
from audiokv_cli.errors import AudiokvError


def _clip(seconds=4.0):
    return (np.random.default_rng(3).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


def _one_shot(adapter, prepared, policy, tokens=8):
    session = CompressionSession(policy, adapter, prepared)
    with use_attention_handler(adapter, session):
        logits, _ = prefill(adapter, prepared.inputs, session.cache)
        ids, *_ = decode_greedy(adapter, session.cache, logits, tokens, stop_at_eos=False)
    return logits, ids, session


def _chunked(adapter, prepared, policy, chunk, tokens=8):
    session = ChunkedSession(policy, adapter, prepared, chunk)
    logits, _ = chunked_prefill(adapter, prepared, session)
    with use_attention_handler(adapter, session):
        ids, *_ = decode_greedy(adapter, session.cache, logits, tokens, stop_at_eos=False)
    return logits, ids, session


@pytest.mark.parametrize("method", ["full", "snapkv", "adakv", "audiokv"])
def test_chunks_that_never_evict_early_match_one_shot(random_adapter, method):
    prepared = random_adapter.prepare(_clip())
    head_scores = torch.rand(random_adapter.geometry.num_layers, random_adapter.geometry.num_query_heads)
    policy = build_policy(method, 0.8, MethodOptions(window=8, head_scores=head_scores))
    base_logits, base_ids, base = _one_shot(random_adapter, prepared, policy)
    # One chunk is one-shot prefill; with two, the first fits in the budget so all of it is still held at the end.
    for chunk in (prepared.prompt_tokens, prepared.prompt_tokens // 2 + 1):
        logits, ids, session = _chunked(random_adapter, prepared, policy, chunk)
        torch.testing.assert_close(logits, base_logits, atol=1e-4, rtol=0)
        assert session.kept_bytes() == base.kept_bytes() or method == "full"
        if chunk == prepared.prompt_tokens:
            assert ids == base_ids


def test_peak_cache_is_budget_plus_one_chunk(random_adapter):
    prepared = prompt_of(random_adapter, 1600, max_seconds=20.0)
    assert prepared.prompt_tokens == 1600
    policy = build_policy("snapkv", 0.2, MethodOptions(window=16))
    chunk = 128
    _, ids, session = _chunked(random_adapter, prepared, policy, chunk, tokens=4)
    per_token = random_adapter.geometry.kv_bytes_per_token(torch.float32)
    layers = random_adapter.geometry.num_layers
    kept = session.kept_bytes()
    assert kept <= 0.21 * 1600 * per_token
    # Layers already compressed after this chunk, the one compressing (budget + chunk), the rest at budget.
    assert session.peak_prefill_bytes <= 1.1 * (kept + chunk * per_token / layers)
    _, _, one_shot = _one_shot(random_adapter, prepared, policy, tokens=4)
    assert one_shot.peak_prefill_bytes > 1.5 * session.peak_prefill_bytes
    assert len(ids) == 4


def test_position_scorers_are_refused(random_adapter):
    prepared = random_adapter.prepare(_clip(1.0))
    with pytest.raises(AudiokvError, match="ranks positions by index"):
        ChunkedSession(build_policy("stride", 0.5), random_adapter, prepared, 64)
    with pytest.raises(AudiokvError, match="at least 1"):
        ChunkedSession(build_policy("snapkv", 0.5), random_adapter, prepared, 0)


def test_infer_prefill_chunk(random_model_dir, tone_wav):
    import json

    from typer.testing import CliRunner

    from audiokv_cli.cli import app

    def text(*extra):
        result = CliRunner().invoke(
            app, ["infer", str(tone_wav), "--model", str(random_model_dir), "--device", "cpu", "--method", "snapkv",
                  "--retention", "0.6", "--max-new-tokens", "6", "--json", *extra],
        )
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout.splitlines()[-1])["text"]

    assert text("--prefill-chunk", "100000") == text()
