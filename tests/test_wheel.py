"""A built wheel is complete: installed on its own, away from the source tree, `infer --method audiokv` finds
the bundled model and its shipped head profile."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Build outputs and caches of a working tree: never part of a wheel, and .build can be large.
NOT_SOURCE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".build", ".venv",
                                    ".pytest_cache", "out")


@pytest.mark.slow
def test_wheel_installed_alone_finds_model_and_profile(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=NOT_SOURCE)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(source)], check=True, timeout=300)
    (wheel,) = dist.glob("audiokv-*.whl")
    shutil.rmtree(source)  # nothing left to import from but the wheel

    # Installed on its own into a folder put first on the path of the interpreter running the tests: the
    # dependencies are that interpreter's (a virtualenv's or the system's, whichever runs pytest), audiokv comes from
    # the wheel alone. (A venv with system_site_packages would see the base interpreter, not an active virtualenv.)
    installed = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(installed), str(wheel)],
                   check=True, timeout=300)
    workdir = tmp_path / "elsewhere"  # no ./profiles here
    workdir.mkdir()
    shutil.copy(ROOT / "examples" / "clip1.wav", workdir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(installed)}
    where = subprocess.run([sys.executable, "-c", "import audiokv_cli; print(audiokv_cli.__file__)"], cwd=workdir,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(installed)), where

    # The console script pip wrote runs this interpreter (its shebang) on the wheel's code.
    run = subprocess.run([str(installed / "bin" / "audiokv"), "infer", "clip1.wav", "--model", "tiny", "--method", "audiokv", "--retention",
                          "0.7", "--json"], cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"{installed}" in run.stderr and "assets/profiles/tiny.safetensors" in run.stderr, run.stderr
    record = json.loads(run.stdout.strip().splitlines()[-1])
    assert record["method"] == "audiokv" and record["kv_bytes_kept"] <= 0.71 * record["kv_bytes_full"]
    expected = (ROOT / "examples" / "clip1.txt").read_text().lower().split()
    assert record["text"].lower().strip(" .").split() == [w.strip(".") for w in expected]
