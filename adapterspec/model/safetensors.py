"""The safetensors file format: dtype codes, headers read without mlx, and the header encoder."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import UserError

MAX_HEADER_BYTES = 100 * 1024 * 1024


# safetensors dtype codes → (mlx dtype name, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "U16": ("uint16", 2),
    "I16": ("int16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "U32": ("uint32", 4),
    "I32": ("int32", 4),
    "F32": ("float32", 4),
    "C64": ("complex64", 8),
    "U64": ("uint64", 8),
    "I64": ("int64", 8),
    "F64": ("float64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}


class CorruptWeightFile(UserError):
    """A safetensors file whose header cannot be read."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: dtype code ("F32"), shape, byte offsets in the data section."""

    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]

    @property
    def dtype_name(self) -> str:
        """The dtype as mlx names it ("float32")."""
        return SAFETENSORS_DTYPES[self.dtype][0]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file, read from its header only (pure Python)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            file_size = os.fstat(f.fileno()).st_size
            if len(head) < 8:
                raise _corrupt(path, "the file is shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
                raise _corrupt(path, f"the header length {header_len} does not fit in a file of {file_size} bytes")
            raw = f.read(header_len)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"the header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    return _tensor_infos(path, header, file_size - 8 - header_len)


def _tensor_infos(path: Path, header: dict, data_size: int) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise _corrupt(path, f"tensor {name!r} has no valid dtype/shape/data_offsets") from e
        if dtype not in SAFETENSORS_DTYPES:
            raise _corrupt(path, f"tensor {name!r} has unknown dtype {dtype!r}")
        info = TensorInfo(dtype, shape, (start, end))
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not (0 <= start <= end <= data_size):
            raise _corrupt(path, f"tensor {name!r} has invalid shape or offsets (the file may be truncated)")
        if end - start != info.size * SAFETENSORS_DTYPES[dtype][1]:
            raise _corrupt(path, f"tensor {name!r}: its offsets do not match its shape and dtype")
        tensors[name] = info
    return tensors


def _corrupt(path: Path, why: str) -> CorruptWeightFile:
    return CorruptWeightFile(
        f"{path}: not a valid safetensors file: {why}",
        help="the file may be truncated or damaged; download or convert the model again",
    )


DTYPE_CODES = {name: code for code, (name, _) in SAFETENSORS_DTYPES.items()}


ITEM_SIZES = {name: size for name, size in SAFETENSORS_DTYPES.values()}


def nbytes_of(dtype: str, shape: Sequence[int]) -> int:
    return ITEM_SIZES[dtype] * math.prod(shape)


def encode_header(entries: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The length prefix and JSON header of a safetensors file holding `entries` (name, dtype, shape) in order."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in entries:
        size = nbytes_of(dtype, shape)
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw
