"""Model loading: the dtype auto picks, and the attention implementation of the parts audiokv leaves alone."""

import pytest
import torch

from audiokv_cli.errors import AudiokvError
from audiokv_cli.models.registry import load_adapter, resolve_dtype


def test_auto_dtype(monkeypatch):
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    # A GPU without bfloat16 kernels (before Ampere) would only emulate it: float16 instead.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_attn_implementation(random_model_dir):
    adapter = load_adapter(str(random_model_dir), device="cpu", attn_implementation="eager")
    assert adapter.model.config._attn_implementation == "eager"
    assert adapter.text_config._attn_implementation == "eager"
    with pytest.raises(AudiokvError, match="--attn-implementation"):
        load_adapter(str(random_model_dir), device="cpu", attn_implementation="warp-drive")
