import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from audiokv_cli.io.audio import load_audio
from audiokv_cli.cli import app
from audiokv_cli.compression.methods import MethodOptions, resolve_method
from audiokv_cli.errors import AudiokvError
from audiokv_cli.evaluation.datasets import Example
from audiokv_cli.evaluation.sweep import (
    parse_methods,
    parse_retentions,
    parse_scopes,
    plan_cells,
    run_sweep,
)
from audiokv_cli.runtime.inference import run_clip
from tests.conftest import write_tone

runner = CliRunner()
REPORT_FILES = {"results.csv", "results.json", "summary.csv", "summary.json", "wer_vs_retention.png"}
TIMING = {"seconds_prefill", "seconds_compress", "seconds_decode", "mean_seconds_prefill", "mean_seconds_decode"}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def random_head_scores(adapter, seed=0):
    geometry = adapter.geometry
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(geometry.num_layers, geometry.num_query_heads, generator=generator)


def write_profile(adapter, path: Path) -> Path:
    """A valid head-profile file for ``adapter`` with random statistics."""
    from audiokv_cli.profiling.profile_file import HeadProfile, save_profile
    from audiokv_cli.profiling.statistics import HeadStatistics

    geometry = adapter.geometry
    stats = HeadStatistics.zeros(geometry.num_layers, geometry.num_query_heads, top_k=4)
    generator = torch.Generator().manual_seed(1)
    stats.hit_counts += torch.randint(0, 40, stats.shape, generator=generator)
    stats.steps += 10
    provenance = {"statistic": "topk_hits", "top_k": 4, "scored_steps": 10}
    return save_profile(HeadProfile(stats, adapter.fingerprint(), provenance), path)


# ----------------------------------------------------------------------------------------------- name resolution


def test_method_names_resolve_to_parts():
    assert resolve_method("snapkv+sss").smoother == "sss" and resolve_method("snapkv+sss").method == "snapkv"
    nosss = resolve_method("audiokv-nosss")
    assert (nosss.method, nosss.smoother, nosss.uses_profile) == ("audiokv", "avgpool", True)
    assert resolve_method("pyramidkv+maxpool").smoother == "maxpool"
    explicit = resolve_method("window+sss+profile")
    assert (explicit.scorer, explicit.smoother, explicit.budget, explicit.uses_profile) == ("window", "sss", "profile", True)
    assert resolve_method("full").is_full and not resolve_method("snapkv").is_full
    policy = resolve_method("snapkv+sss").policy(0.5, MethodOptions())
    assert (policy.scorer.name, policy.smoother.name, policy.budget.name) == ("window", "sss", "uniform")
    for bad in ("snap", "full+sss", "snapkv+blur", "window+sss"):
        with pytest.raises(AudiokvError):
            resolve_method(bad)


def test_parsers_validate():
    assert parse_retentions("0.4, 0.8,0.4") == [0.8, 0.4]
    assert parse_scopes("all,audio") == ["all", "audio"]
    for text in ("0", "1.5", "x", ""):
        with pytest.raises(AudiokvError):
            parse_retentions(text)
    with pytest.raises(AudiokvError):
        parse_scopes("text")
    with pytest.raises(AudiokvError):
        parse_methods("snapkv,snapkv")


def test_plan_has_one_full_cell():
    cells = plan_cells(parse_methods("full,snapkv,h2o"), [0.8, 0.4], ["all", "audio"], MethodOptions())
    assert [c.key for c in cells[:1]] == [("full", 1.0, None)]
    assert len(cells) == 1 + 2 * 2 * 2
    assert {c.policy.scope for c in cells if c.method == "snapkv"} == {"all", "audio"}


# ------------------------------------------------------------------------------------------------- equivalence


def test_shared_prefill_matches_run_clip(random_adapter, tmp_path):
    """One recorded prefill, many cells: every cell decodes exactly what a live compressed run_clip gives."""
    clip = write_tone(tmp_path / "clip.wav", seconds=3.0)
    audio = load_audio(clip)
    options = MethodOptions(window=8, head_scores=random_head_scores(random_adapter))
    specs = parse_methods("full,streamingllm,h2o,snapkv,pyramidkv,adakv,random,stride,snapkv+sss,audiokv-nosss,audiokv")
    cells = plan_cells(specs, [0.7, 0.3], ["all", "audio"], options)
    max_new = 6
    swept = run_sweep(random_adapter, [Example("clip", clip, "a b c")], cells, max_new, load_audio=lambda p: audio)
    assert len(swept.clips) == len(cells)
    kept_bytes = set()
    for cell, row in zip(cells, swept.clips):
        live = run_clip(random_adapter, audio, cell.policy, max_new_tokens=max_new)
        assert row["hyp"] == live.text, cell.key
        assert row["generated_tokens"] == live.generated_tokens, cell.key
        assert row["kv_bytes_kept"] == live.kv_bytes_kept, cell.key
        assert row["kv_bytes_full"] == live.kv_bytes_full, cell.key
        assert row["hit_token_limit"] == live.hit_token_limit, cell.key
        kept_bytes.add(row["kv_bytes_kept"])
    # Guard against a vacuous comparison: the cells really compress to different sizes, and something is decoded.
    assert len(kept_bytes) > 3
    assert any(row["generated_tokens"] > 0 for row in swept.clips)
    assert len({row["hyp"] for row in swept.clips}) > 2  # eviction changes what is decoded
    full = swept.clips[0]
    assert full["method"] == "full" and full["kv_bytes_kept"] == full["kv_bytes_full"]


def test_shared_prefill_token_ids_match(random_adapter, tmp_path):
    """Token ids (not only text) agree, for the score-based methods where reuse could go wrong."""
    from audiokv_cli.evaluation.sweep import run_cell
    from audiokv_cli.runtime.runner import record_prefill

    audio = load_audio(write_tone(tmp_path / "clip.wav", seconds=2.0))
    prepared = random_adapter.prepare(audio, None)
    cells = plan_cells(parse_methods("h2o,adakv,snapkv+sss"), [0.5], ["all"], MethodOptions(window=4))
    record = record_prefill(random_adapter, prepared, [c.policy for c in cells])
    for cell in cells:
        outcome = run_cell(random_adapter, prepared, record, cell.policy, 5)
        again = run_cell(random_adapter, prepared, record, cell.policy, 5)  # the record is not consumed
        live = run_clip(random_adapter, audio, cell.policy, max_new_tokens=5)
        assert outcome.token_ids == again.token_ids == live.token_ids, cell.key
        assert outcome.kept_per_head == live.kept_per_head, cell.key


# ------------------------------------------------------------------------------------------------- command line


def _clips(directory: Path, count: int = 2) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return [write_tone(directory / f"c{i}.wav", seconds=1.0 + 0.5 * i) for i in range(count)]


def make_manifest(root: Path) -> Path:
    clips = _clips(root / "clips")
    lines = [json.dumps({"audio": f"clips/{p.name}", "text": f"clip number {i}", "id": f"m{i}"}) for i, p in enumerate(clips)]
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root / "manifest.jsonl"


def make_librispeech(root: Path) -> Path:
    chapter = root / "test-clean" / "19" / "198"
    chapter.mkdir(parents=True)
    for i in range(2):
        write_tone(chapter / f"19-198-000{i}.flac", seconds=1.0 + 0.5 * i)
    (chapter / "19-198.trans.txt").write_text("19-198-0000 HELLO WORLD\n19-198-0001 GOOD MORNING TO YOU\n")
    return root


def make_paired(root: Path) -> Path:
    for i, clip in enumerate(_clips(root)):
        clip.with_suffix(".txt").write_text(f"the quick brown fox {i}\n")
    return root


@pytest.mark.parametrize("layout", ["manifest", "librispeech", "paired"])
def test_eval_end_to_end(layout, random_model_dir, tmp_path):
    make = {"manifest": make_manifest, "librispeech": make_librispeech, "paired": make_paired}[layout]
    data = make(tmp_path / "data")
    out = tmp_path / "out"
    methods = "full,snapkv,snapkv+sss,h2o"
    args = ["eval", "--model", random_model_dir, "--data", data, "--methods", methods, "--retention", "0.8,0.4",
            "--scope", "all,audio", "--max-new-tokens", "4", "--window", "4", "--out", out, "--device", "cpu"]
    if layout == "manifest":
        profile = write_profile(_adapter_for(random_model_dir), tmp_path / "profile")
        args[args.index(methods)] = methods + ",audiokv,audiokv-nosss"
        args += ["--profile", profile]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert REPORT_FILES <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    summary = json.loads((out / "summary.json").read_text())
    cells = summary["cells"]
    method_count = 5 if layout == "manifest" else 3
    assert len(cells) == 1 + method_count * 2 * 2
    assert cells[0]["method"] == "full" and cells[0]["scope"] is None
    clips = json.loads((out / "results.json").read_text())["clips"]
    assert len(clips) == 2 * len(cells)
    assert {"ref", "hyp", "ref_normalized", "hyp_normalized", "wer", "degenerate", "kv_bytes_kept"} <= set(clips[0])
    for row in clips:
        assert 0 < row["kv_bytes_kept"] <= row["kv_bytes_full"]
    low = [c for c in cells if c["retention"] == 0.4 and c["scope"] == "all"]
    assert all(0.3 < c["mean_kept_ratio"] < 0.5 for c in low)
    assert "full cache" in result.stdout and "scope" in result.stdout.lower()


_adapters = {}


def _adapter_for(model_dir):
    from audiokv_cli.models import load_adapter

    if model_dir not in _adapters:
        _adapters[model_dir] = load_adapter(str(model_dir), device="cpu", dtype="float32")
    return _adapters[model_dir]


def test_eval_is_reproducible(random_model_dir, tmp_path):
    data = make_paired(tmp_path / "data")
    outputs = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        result = invoke("eval", "--model", random_model_dir, "--data", data, "--methods", "full,random,adakv",
                        "--retention", "0.5", "--max-new-tokens", "3", "--out", out)
        assert result.exit_code == 0, result.output
        rows = json.loads((out / "results.json").read_text())["clips"]
        outputs.append([{k: v for k, v in row.items() if k not in TIMING} for row in rows])
    assert outputs[0] == outputs[1]


def test_parallel_workers_give_the_serial_rows(random_model_dir, tmp_path):
    data = make_paired(tmp_path / "data")
    write_tone(data / "c9.wav", seconds=2.0)
    (data / "c9.txt").write_text("a third clip\n")
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        result = invoke("eval", "--model", random_model_dir, "--data", data, "--methods", "full,snapkv,h2o",
                        "--retention", "0.6,0.3", "--scope", "all,audio", "--max-new-tokens", "4",
                        "--workers", workers, "--out", out)
        assert result.exit_code == 0, result.output
        rows = json.loads((out / "results.json").read_text())["clips"]
        cells = json.loads((out / "summary.json").read_text())["cells"]
        outputs.append((
            [{k: v for k, v in row.items() if k not in TIMING} for row in rows],
            [{k: v for k, v in cell.items() if k not in TIMING} for cell in cells],
        ))
    assert len(outputs[0][0]) == 3 * 9
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "full,bogus"], "unknown method 'bogus'"),
        (["--retention", "0.5,1.2"], "(0, 1]"),
        (["--retention", "0"], "(0, 1]"),
        (["--scope", "all,text"], "unknown scope 'text'"),
        (["--sss-rho", "0"], "--sss-rho"),
        (["--methods", "audiokv", "--profile", "missing.safetensors"], "no such profile file"),
    ],
)
def test_eval_bad_options(extra, message, tmp_path):
    data = make_paired(tmp_path / "data")
    # A model that does not exist proves validation happens before any loading.
    result = invoke("eval", "--model", tmp_path / "no-model", "--data", data, "--out", tmp_path / "out", *extra)
    assert result.exit_code == 1
    assert "error:" in result.output and message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_eval_missing_data(tmp_path):
    result = invoke("eval", "--data", tmp_path / "nothing", "--methods", "full")
    assert result.exit_code == 1 and "error:" in result.output and "no such file" in result.output


def test_eval_profile_method_without_profile(random_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./profiles here; the random test model matches no shipped profile
    data = make_paired(tmp_path / "data")
    result = invoke("eval", "--model", random_model_dir, "--data", data, "--methods", "full,audiokv", "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert "error:" in result.output and "no head profile" in result.output and "audiokv profile" in result.output
    assert not (tmp_path / "out").exists()
