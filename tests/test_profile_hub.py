"""`--profile` Hub references resolve through a (temporary, offline) Hugging Face cache; the fingerprint check holds."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from audiokv_cli.cli import app
from audiokv_cli.profiling.profile_file import ProfileError, save_profile
from audiokv_cli.profiling.reference import is_hub_reference, locate_profile
from tests.conftest import write_tone
from tests.test_profile_file import FINGERPRINT, FakeAdapter, make_profile

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline cache holding acme/profiles at one commit: a profile for the tiny geometry and one for another."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--acme--profiles"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    save_profile(make_profile(fingerprint={**FINGERPRINT, "name_or_path": "acme/tiny"}), snapshot / "tiny")
    save_profile(make_profile(fingerprint={**FINGERPRINT, "num_layers": 3, "name_or_path": "big"}), snapshot / "sub" / "big")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snapshot


def test_reference_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_reference("hf://acme/profiles/tiny.safetensors")
    assert is_hub_reference("acme/profiles")
    assert not is_hub_reference("profiles/tiny.safetensors")  # a local file name
    (tmp_path / "acme").mkdir()
    (tmp_path / "acme" / "profiles").write_text("")
    assert not is_hub_reference("acme/profiles")  # an existing local path wins


def test_file_reference_resolves_in_the_cache(hub_cache):
    path = locate_profile("hf://acme/profiles/tiny.safetensors", FakeAdapter())
    assert path.resolve() == (hub_cache / "tiny.safetensors").resolve()
    assert locate_profile("hf://acme/profiles/sub/big.safetensors", FakeAdapter()).name == "big.safetensors"


def test_repo_reference_picks_the_matching_profile(hub_cache):
    assert locate_profile("acme/profiles", FakeAdapter()).name == "tiny.safetensors"
    assert locate_profile("acme/profiles", FakeAdapter(num_layers=3)).name == "big.safetensors"
    with pytest.raises(ProfileError, match="no profile for"):
        locate_profile("acme/profiles", FakeAdapter(num_layers=7))


@pytest.mark.parametrize(
    "reference, message",
    [
        ("hf://acme/profiles/missing.safetensors", "huggingface-cli download acme/profiles missing.safetensors"),
        ("acme/elsewhere", "not in the local Hugging Face cache"),
        ("hf://acme/profiles", "hf://OWNER/REPO/FILE"),
        ("hf://acme/profiles/tiny.json", "names a .safetensors file"),
    ],
)
def test_missing_or_malformed_references_are_one_line(hub_cache, reference, message):
    with pytest.raises(ProfileError, match=message.replace(".", r"\.")) as error:
        locate_profile(reference, FakeAdapter())
    assert "\n" not in str(error.value)


def test_infer_with_a_hub_profile(hub_cache, random_model_dir, random_adapter, tmp_path):
    clip = write_tone(tmp_path / "clip.wav", seconds=4.0)
    args = ["infer", str(clip), "--model", str(random_model_dir), "--method", "audiokv", "--retention", "0.5",
            "--max-new-tokens", "3", "--json"]
    # A profile measured on this very checkpoint (its fingerprint carries the weights' signature).
    save_profile(make_profile(fingerprint=random_adapter.fingerprint()), hub_cache / "mine")
    result = CliRunner().invoke(app, args + ["--profile", "hf://acme/profiles/mine.safetensors"])
    assert result.exit_code == 0, result.output
    assert f"using head profile {hub_cache}" in result.stderr.replace("\n", "")
    assert json.loads(result.stdout.splitlines()[-1])["method"] == "audiokv"
    # One of the same architecture made on another checkpoint ("acme/tiny") is used only when asked for.
    other = CliRunner().invoke(app, args + ["--profile", "hf://acme/profiles/tiny.safetensors"])
    assert other.exit_code == 1 and "--allow-profile-mismatch" in other.stderr
    asked = CliRunner().invoke(app, args + ["--profile", "hf://acme/profiles/tiny.safetensors", "--allow-profile-mismatch"])
    assert asked.exit_code == 0, asked.output
    # The fingerprint check applies as for a local file: a profile for another geometry is refused in one line.
    refused = CliRunner().invoke(app, args + ["--profile", "hf://acme/profiles/sub/big.safetensors"])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "error:" in refused.stderr and len(refused.stderr.strip().splitlines()) == 2  # "using ..." + the error
