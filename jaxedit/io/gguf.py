"""A small, fast GGUF reader: metadata and memory-mapped tensor data.

The `gguf` package's reader builds a numpy view per metadata item and takes ~10 s on a
49k-token vocabulary; parsing the (simple, documented) header with `struct` takes milliseconds.
Dequantisation is still done by `gguf.quants`.
Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxedit.errors import CheckpointError

_MAGIC = b"GGUF"
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NP = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: fastest-varying dimension first
    qtype: int
    offset: int  # absolute, in the file


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: cannot read ({e})") from e
        # The header is parsed through a plain memoryview: slicing the memmap itself builds a
        # memmap object per slice, which made the ~100k vocabulary strings take seconds.
        self._buf = memoryview(self.data.view(np.ndarray))
        self.pos = 0
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: truncated or corrupt GGUF file ({e})") from e

    # -- primitive readers
    def _take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self._buf):
            raise ValueError("unexpected end of file")
        b = self._buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def _scalar(self, fmt: str):
        if self.pos + struct.calcsize(fmt) > len(self._buf):
            raise ValueError("unexpected end of file")
        (value,) = struct.unpack_from(fmt, self._buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        return str(self._take(self._scalar("<Q")), "utf-8")

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            itype, count = self._scalar("<I"), self._scalar("<Q")
            if itype in _NP:  # numeric arrays in one read
                arr = np.frombuffer(self._take(count * np.dtype(_NP[itype]).itemsize), _NP[itype])
                return arr.tolist()
            if itype == _STRING:  # vocabularies: ~100k strings, so a tight loop
                buf, pos, out = self._buf, self.pos, []
                for _ in range(count):
                    (n,) = struct.unpack_from("<Q", buf, pos)
                    if pos + 8 + n > len(buf):
                        raise ValueError("unexpected end of file")
                    out.append(str(buf[pos + 8 : pos + 8 + n], "utf-8"))
                    pos += 8 + n
                self.pos = pos
                return out
            return [self._value(itype) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return self._scalar(_SCALARS[vtype])

    def _parse(self) -> None:
        if bytes(self._take(4)) != _MAGIC:
            raise CheckpointError(f"{self.path}: not a GGUF file (bad magic)")
        version = self._scalar("<I")
        if version not in (2, 3):
            raise CheckpointError(f"{self.path}: GGUF version {version} not supported")
        n_tensors, n_kv = self._scalar("<Q"), self._scalar("<Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = tuple(self._scalar("<Q") for _ in range(self._scalar("<I")))
            infos.append((name, dims, self._scalar("<I"), self._scalar("<Q")))
        align = int(self.fields.get("general.alignment", 32))
        start = (self.pos + align - 1) // align * align
        self.tensors = [GGUFTensor(n, d, t, start + o) for n, d, t, o in infos]

    def read(self, t: GGUFTensor) -> np.ndarray:
        """Dequantised fp32 array in row-major (torch) order: shape reversed from ggml's."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        try:
            qtype = GGMLQuantizationType(t.qtype)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{self.path}: tensor {t.name} has unknown type {t.qtype}") from e
        n = int(np.prod(t.shape))
        nbytes = n // block * type_size
        if t.offset + nbytes > len(self.data):
            raise CheckpointError(f"{self.path}: tensor {t.name} runs past the end of the file")
        raw = self.data[t.offset : t.offset + nbytes].view(np.ndarray)
        shape = tuple(reversed(t.shape))
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            raw = raw.view(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16)
            return raw.astype(np.float32).reshape(shape)
        if qtype.name in _LEGACY:
            return _LEGACY[qtype.name](raw.reshape(-1, type_size)).reshape(shape)
        raw = raw.reshape(shape[:-1] + (shape[-1] // block * type_size,))
        return np.asarray(dequantize(raw, qtype), np.float32).reshape(shape)


# ----------------------------------------------------------------------------- dequantisation
# The legacy 32-element block formats, vectorised over all blocks at once (`gguf.quants` works
# row group by row group and is ~10x slower on them). Layouts (ggml-common.h), x = element:
#   Q4_0: d:f16, qs:u8[16]            x = d * (q - 8),  q = low nibbles then high nibbles
#   Q4_1: d:f16, m:f16, qs:u8[16]     x = d * q + m
#   Q8_0: d:f16, qs:i8[32]            x = d * q
# Each agrees exactly with `gguf.quants.dequantize` (tested).


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[N 16] bytes -> [N 32] fp32 4-bit values: element j < 16 is byte j's low nibble, j >= 16
    the high nibble of byte j - 16. Written in place: no [N 32] temporaries beyond the output."""
    out = np.empty((qs.shape[0], 2, 16), np.float32)
    np.bitwise_and(qs, 0x0F, out=out[:, 0], casting="unsafe")
    np.right_shift(qs, 4, out=out[:, 1], casting="unsafe")
    return out.reshape(-1, 32)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at : at + 2].copy().view(np.float16).astype(np.float32)  # [N 1]


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    x = _nibbles(blocks[:, 2:])
    x -= 8.0
    x *= _f16(blocks, 0)
    return x


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    x = _nibbles(blocks[:, 4:])
    x *= _f16(blocks, 0)
    x += _f16(blocks, 2)
    return x


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    x = blocks[:, 2:].view(np.int8).astype(np.float32)
    x *= _f16(blocks, 0)
    return x


_LEGACY = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0}
