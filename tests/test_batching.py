"""Batches of clips of different lengths: every row's greedy tokens are those of the clip run alone."""

import numpy as np
import pytest
import torch

from audiokv_cli.runtime.batching import run_clips
from audiokv_cli.compression.methods import METHODS, MethodOptions, build_policy
from audiokv_cli.runtime.inference import run_clip


def _clips():
    rng = np.random.default_rng(5)
    return [(rng.standard_normal(int(16000 * s)) * 0.1).astype(np.float32) for s in (3.0, 1.0, 2.2)]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_batch_matches_one_clip_at_a_time(random_adapter, method):
    geometry = random_adapter.geometry
    head_scores = torch.rand(geometry.num_layers, geometry.num_query_heads, generator=torch.Generator().manual_seed(0))
    policy = build_policy(method, 1.0 if method == "full" else 0.5, MethodOptions(window=8, head_scores=head_scores))
    clips = _clips()
    batch = run_clips(random_adapter, clips, policy, max_new_tokens=8)
    for clip, result in zip(clips, batch):
        alone = run_clip(random_adapter, clip, policy, max_new_tokens=8)
        assert result.token_ids == alone.token_ids
        assert result.prompt_tokens == alone.prompt_tokens
        assert result.kv_bytes_kept == alone.kv_bytes_kept  # padding is never kept, never counted


def test_infer_batch_size(random_model_dir, tmp_path):
    import json

    import soundfile
    from typer.testing import CliRunner

    from audiokv_cli.cli import app

    paths = []
    for index, clip in enumerate(_clips()):
        paths.append(tmp_path / f"clip{index}.wav")
        soundfile.write(paths[-1], clip, 16000)
    common = ["--model", str(random_model_dir), "--device", "cpu", "--method", "snapkv", "--retention", "0.5",
              "--max-new-tokens", "6", "--json"]

    def rows(*extra):
        result = CliRunner().invoke(app, ["infer", *map(str, paths), *common, *extra])
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

    alone, batched = rows(), rows("--batch-size", "2")
    assert [row["clip"] for row in batched] == [str(path) for path in paths]
    assert [row["text"] for row in batched] == [row["text"] for row in alone]
    result = CliRunner().invoke(app, ["infer", str(paths[0]), *common, "--batch-size", "2", "--prefill-chunk", "64"])
    assert result.exit_code == 1 and "does not combine" in result.output


def test_other_families_are_refused(random_adapter):
    from audiokv_cli.runtime.batching import check_batchable
    from audiokv_cli.errors import AudiokvError

    class Other:
        name = "other-family"

    check_batchable(random_adapter)
    with pytest.raises(AudiokvError, match="supports the Qwen2-Audio family so far, not other-family"):
        check_batchable(Other())


def test_eval_cell_batches_match_one_cell_at_a_time(random_adapter):
    """`eval --batch-size`: a decoder-only clip's cells decoded together give each cell's own tokens and bytes."""
    from audiokv_cli.evaluation.sweep import Cell, clip_outcomes

    geometry = random_adapter.geometry
    head_scores = torch.rand(geometry.num_layers, geometry.num_query_heads, generator=torch.Generator().manual_seed(1))
    options = MethodOptions(window=8, head_scores=head_scores)
    cells = [Cell("full", 1.0, None, build_policy("full", 1.0, options))]
    cells += [Cell(m, r, "all", build_policy(m, r, options)) for m in sorted(METHODS) if m != "full" for r in (0.5, 0.2)]
    prepared = random_adapter.prepare(_clips()[0])
    alone = {cell.key: outcome for cell, outcome, _ in clip_outcomes(random_adapter, prepared, cells, 8, batch_size=1)}
    batched = list(clip_outcomes(random_adapter, prepared, cells, 8, batch_size=4))
    assert [cell.key for cell, _, _ in batched] == [cell.key for cell in cells]
    for cell, outcome, _ in batched:
        assert outcome.token_ids == alone[cell.key].token_ids, cell.key
        # the one-cell figure also counts the ragged cache's per-head segment lengths (int64, 8 bytes per head)
        index_bytes = 8 * geometry.num_layers * geometry.num_kv_heads
        assert 0 <= alone[cell.key].kv_bytes_kept - outcome.kv_bytes_kept <= index_bytes, cell.key
        assert outcome.kept_per_head == alone[cell.key].kept_per_head, cell.key
