"""`--device-map`: accelerate places the model; the output is the plain load's, and bad values fail in one line."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from audiokv_cli.cli import app
from audiokv_cli.compression.methods import build_policy
from audiokv_cli.errors import AudiokvError
from audiokv_cli.runtime.inference import run_clip
from audiokv_cli.models import load_adapter

pytest.importorskip("accelerate")


def _audio(seconds: float = 2.0) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32)


def test_a_model_spread_over_cpu_and_disk_gives_the_plain_load_tokens(random_model_dir, random_adapter, tmp_path, monkeypatch):
    """accelerate places the model (half the decoder and the LM head offloaded to disk, loaded layer by layer as
    the forward reaches them) and the compressed run's tokens stay those of the plain load."""
    import transformers

    from audiokv_cli.models import registry

    # No GPU here, so an explicit map stands in for the memory limits that push `auto` onto disk. (`auto` with a
    # small CPU limit offloads the audio tower too, whose position table transformers reads without a forward.)
    spread_map = {
        "model.audio_tower": "cpu", "model.multi_modal_projector": "cpu", "model.language_model.embed_tokens": "cpu",
        "model.language_model.rotary_emb": "cpu", "model.language_model.layers.0": "cpu",
        "model.language_model.layers.1": "disk", "model.language_model.norm": "cpu", "lm_head": "disk",
    }
    placed = {"device_map": spread_map, "offload_folder": str(tmp_path / "offload")}
    monkeypatch.setattr(registry, "placement", lambda device_map: placed if device_map == "auto" else device_map)
    seen = []
    original = transformers.Qwen2AudioForConditionalGeneration.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.Qwen2AudioForConditionalGeneration, "from_pretrained", classmethod(spy))
    mapped = load_adapter(str(random_model_dir), device="cpu", dtype="float32", device_map="auto")
    assert seen == [spread_map]  # placement was handed to transformers/accelerate, not done by audiokv
    assert mapped.model.hf_device_map == spread_map
    # Offloaded weights are not resident: they wait on the meta device until their module runs.
    devices = {name: str(p.device) for name, p in mapped.model.named_parameters()}
    assert {d for n, d in devices.items() if n.startswith("model.language_model.layers.1.")} == {"meta"}
    assert {d for n, d in devices.items() if n.startswith("model.language_model.layers.0.")} == {"cpu"}
    for method in ("full", "snapkv"):
        policy = build_policy(method, 0.4) if method != "full" else None
        plain = run_clip(random_adapter, _audio(), policy, max_new_tokens=6)
        spread = run_clip(mapped, _audio(), policy, max_new_tokens=6)
        assert spread.token_ids == plain.token_ids and len(plain.token_ids) >= 3, method


def test_device_map_needs_accelerate(random_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(AudiokvError, match="accelerate"):
        load_adapter(str(random_model_dir), device="cpu", dtype="float32", device_map="auto")


def test_cli_choices_are_the_library_ones():
    from audiokv_cli.commands.common import DeviceMap
    from audiokv_cli.models.registry import DEVICE_MAPS

    assert tuple(m.value for m in DeviceMap) == DEVICE_MAPS


def test_unknown_device_map_is_one_line(tone_wav):
    result = CliRunner().invoke(app, ["infer", str(tone_wav), "--device-map", "everywhere"])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--device-map" in lines[0], result.stderr


def test_torchrun_ranks_of_a_node_spread_over_disjoint_gpus():
    from audiokv_cli.parallel.ranks import Ranks, rank_gpus
    from audiokv_cli.models.registry import placement

    gib = 2**30
    memory = [80 * gib] * 4
    assert rank_gpus(Ranks(0, 1, 0, 1), 4) == [0, 1, 2, 3]  # a lone process sees every GPU
    groups = [rank_gpus(Ranks(r, 2, r, 2), 4) for r in range(2)]
    assert groups == [[0, 1], [2, 3]]
    assert [rank_gpus(Ranks(r, 8, r % 4, 4), 4) for r in range(4)] == [[0], [1], [2], [3]]
    spread = placement("auto", Ranks(3, 4, 1, 2), memory)  # second rank of a node with two ranks
    assert spread == {"device_map": "auto", "max_memory": {2: 80 * gib, 3: 80 * gib, "cpu": "1TiB"}}
    assert placement("auto", Ranks(0, 1, 0, 1), memory) == "auto"
    assert placement(None, Ranks(3, 4, 1, 2), memory) is None
    with pytest.raises(AudiokvError, match="at least one GPU"):
        rank_gpus(Ranks(0, 8, 0, 8), 4)
