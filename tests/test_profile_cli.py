"""`audiokv probe-set`, `profile`, `inspect` and `merge` through the real typer app."""

import shutil
import struct

import pytest
import torch
from typer.testing import CliRunner

from audiokv_cli.profiling.profile_file import load_profile, partial_paths

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


def invoke(*args):
    from audiokv_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def everything(result):
    """stdout and stderr (rich wraps long lines; join them back)."""
    try:
        stderr = result.stderr
    except ValueError:  # older click mixes stderr into output
        stderr = ""
    return " ".join((result.output + stderr).split())


def test_probe_set_profile_inspect_merge(random_model_dir, tmp_path):
    for seed in (0, 1):
        result = invoke("probe-set", "--out", tmp_path / f"probes{seed}", "--n", 1, "--seed", seed,
                        "--min-words", 2, "--max-words", 3, "--voices", "en-us")
        assert result.exit_code == 0, result.output
    common = ["--model", random_model_dir, "--top-k", 4, "--max-new-tokens", 10, "--teacher-forcing",
              "--device", "cpu", "--dtype", "float32"]
    for seed in (0, 1):
        result = invoke("profile", "--data", tmp_path / f"probes{seed}", "--out", tmp_path / f"p{seed}", *common)
        assert result.exit_code == 0, result.output
    assert not partial_paths(tmp_path / "p0")[0].exists()
    shard = load_profile(tmp_path / "p0.safetensors")
    assert shard.provenance["clips"] == 1 and shard.provenance["scored_steps"] > 0

    result = invoke("merge", tmp_path / "p0.safetensors", tmp_path / "p1.safetensors", "--out", tmp_path / "both")
    assert result.exit_code == 0, result.output
    merged = load_profile(tmp_path / "both.safetensors")
    assert torch.equal(merged.stats.steps, shard.stats.steps + load_profile(tmp_path / "p1.safetensors").stats.steps)

    result = invoke("inspect", tmp_path / "both.safetensors", "--png", tmp_path / "heat.png")
    assert result.exit_code == 0, result.output
    assert "top heads" in result.output and "heatmap" in result.output
    assert (tmp_path / "heat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    result = invoke("merge", tmp_path / "p0.safetensors", tmp_path / "p0.safetensors", "--out", tmp_path / "twice")
    assert result.exit_code == 1 and "error:" in everything(result)
    assert "would count it twice" in everything(result)


def test_inspect_rejects_a_corrupt_profile(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10) + b"{not json}")
    result = invoke("inspect", bad)
    assert result.exit_code == 1 and "Traceback" not in everything(result)
    assert "error:" in everything(result) and "not an audiokv profile" in everything(result)
