"""The CTranslate2 model.bin reader against a small file written here byte by byte."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from audiokv_cli.models.assets.ct2 import CT2FormatError, read_ct2


def _string(text: str) -> bytes:
    raw = text.encode() + b"\x00"
    return struct.pack("<H", len(raw)) + raw


def _tensor(name: str, array: np.ndarray, dtype_id: int) -> bytes:
    out = _string(name) + struct.pack("<B", array.ndim)
    out += b"".join(struct.pack("<I", d) for d in array.shape)
    raw = array.tobytes()
    return out + struct.pack("<B", dtype_id) + struct.pack("<I", len(raw)) + raw


def _write_model(path: Path, tensors: list[bytes], aliases: list[tuple[str, str]], version: int = 6) -> None:
    body = struct.pack("<I", version) + _string("WhisperSpec") + struct.pack("<I", 3)
    body += struct.pack("<I", len(tensors)) + b"".join(tensors)
    body += struct.pack("<I", len(aliases)) + b"".join(_string(a) + _string(t) for a, t in aliases)
    path.write_bytes(body)


def test_reads_names_shapes_dtypes_values_and_aliases(tmp_path):
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((6, 2)).astype(np.float16)
    bias = rng.standard_normal(3).astype(np.float32)
    heads = np.array(6, dtype=np.int16)
    flag = np.array(1, dtype=np.int8)
    path = tmp_path / "model.bin"
    _write_model(
        path,
        [
            _tensor("encoder/layer_0/self_attention/linear_0/weight", qkv, 4),
            _tensor("encoder/conv1/bias", bias, 0),
            _tensor("encoder/num_heads", heads, 2),
            _tensor("decoder/pre_norm", flag, 1),
        ],
        [("decoder/projection/weight", "encoder/layer_0/self_attention/linear_0/weight")],
    )
    model = read_ct2(path)
    assert (model.version, model.spec_name, model.revision) == (6, "WhisperSpec", 3)
    assert list(model.tensors) == [
        "encoder/layer_0/self_attention/linear_0/weight",
        "encoder/conv1/bias",
        "encoder/num_heads",
        "decoder/pre_norm",
    ]
    weight = model.tensors["encoder/layer_0/self_attention/linear_0/weight"]
    assert weight.dtype == np.float16 and weight.shape == (6, 2)
    np.testing.assert_array_equal(weight, qkv)
    np.testing.assert_array_equal(model.tensors["encoder/conv1/bias"], bias)
    assert model.tensors["encoder/num_heads"].shape == () and int(model.tensors["encoder/num_heads"]) == 6
    assert int(model.tensors["decoder/pre_norm"]) == 1
    np.testing.assert_array_equal(model.get("decoder/projection/weight"), qkv)


def test_bfloat16_is_widened_to_float32(tmp_path):
    values = np.array([1.5, -2.0, 0.15625], dtype=np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    path = tmp_path / "model.bin"
    _write_model(path, [_tensor("w", bf16, 5)], [])
    np.testing.assert_array_equal(read_ct2(path).tensors["w"], values)


def test_truncated_file_is_rejected(tmp_path):
    path = tmp_path / "model.bin"
    _write_model(path, [_tensor("w", np.ones((4, 4), dtype=np.float16), 4)], [])
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(CT2FormatError, match="truncated"):
        read_ct2(path)


def test_byte_count_must_match_dims(tmp_path):
    bad = _string("w") + struct.pack("<B", 1) + struct.pack("<I", 3) + struct.pack("<B", 4)
    bad += struct.pack("<I", 4) + b"\x00" * 4  # 3 float16 values need 6 bytes
    path = tmp_path / "model.bin"
    _write_model(path, [bad], [])
    with pytest.raises(CT2FormatError, match="dims"):
        read_ct2(path)


def test_unknown_version_is_rejected(tmp_path):
    path = tmp_path / "model.bin"
    _write_model(path, [], [], version=99)
    with pytest.raises(CT2FormatError, match="version"):
        read_ct2(path)
