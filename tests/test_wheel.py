"""A built wheel is complete: installed into a fresh venv, away from the source tree, `infer --method audiokv` finds
the bundled model and its shipped head profile."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Build outputs and caches of a working tree: never part of a wheel, and .build can be large.
NOT_SOURCE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".build", ".venv",
                                    ".pytest_cache", "out")


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_finds_model_and_profile(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=NOT_SOURCE)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(source)], check=True, timeout=300)
    (wheel,) = dist.glob("audiokv-*.whl")
    shutil.rmtree(source)  # nothing left to import from but the wheel

    # System packages stay visible (torch is not installed twice); audiokv itself comes from the wheel only.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, timeout=300)
    workdir = tmp_path / "elsewhere"  # no ./profiles here
    workdir.mkdir()
    shutil.copy(ROOT / "examples" / "clip1.wav", workdir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    where = subprocess.run([str(python), "-c", "import audiokv_cli; print(audiokv_cli.__file__)"], cwd=workdir,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert str(env_dir) in where, where

    run = subprocess.run([str(env_dir / "bin" / "audiokv"), "infer", "clip1.wav", "--model", "tiny", "--method", "audiokv", "--retention",
                          "0.7", "--json"], cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"{env_dir}" in run.stderr and "assets/profiles/tiny.safetensors" in run.stderr, run.stderr
    record = json.loads(run.stdout.strip().splitlines()[-1])
    assert record["method"] == "audiokv" and record["kv_bytes_kept"] <= 0.71 * record["kv_bytes_full"]
    expected = (ROOT / "examples" / "clip1.txt").read_text().lower().split()
    assert record["text"].lower().strip(" .").split() == [w.strip(".") for w in expected]
