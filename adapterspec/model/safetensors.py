"""The safetensors file format: dtype codes, headers read without mlx, and the header encoder."""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import UserError
from ..inputs import check_regular_file
from ..jsonfile import loads

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_NDIM = 16
MAX_NAME_CHARS = 1024
MAX_NAME_SEGMENTS = 64
SEGMENT = r"[^.\x00-\x20\x7f]+"
TENSOR_NAME = re.compile(rf"{SEGMENT}(?:\.{SEGMENT})*")


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
    """The tensors of a safetensors file, read from its header only (pure Python), every field checked."""
    path = Path(path)
    check_regular_file(path)
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
        header = loads(raw.rstrip(b" \x00"), path, "the header", bound_depth=False)  # every field is checked
    except UserError as e:
        raise _corrupt(path, e.message.split(": ", 1)[-1]) from e
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    metadata = header.get("__metadata__")
    metadata = {} if metadata is None else metadata  # mlx writes null when it saves no metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "'__metadata__' is not an object of strings")
    tensors = _tensor_infos(path, header, file_size - 8 - header_len)
    _check_no_overlap(path, tensors)
    return tensors


def _tensor_infos(path: Path, header: dict, data_size: int) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        _check_tensor_name(path, name)
        if not isinstance(entry, dict):
            raise _corrupt(path, f"tensor {name!r} is not an object with dtype, shape and data_offsets")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise _corrupt(
                path, f"tensor {name!r} has unknown dtype {dtype!r} (known: {', '.join(SAFETENSORS_DTYPES)})"
            )
        if type(shape) is not list or len(shape) > MAX_NDIM or not _counts(shape):
            raise _corrupt(path, f"tensor {name!r} has shape {_short(shape)}, not a list of sizes")
        if type(offsets) is not list or len(offsets) != 2 or not _counts(offsets):
            raise _corrupt(path, f"tensor {name!r} has data_offsets {_short(offsets)}, not [start, end]")
        start, end = offsets
        if not start <= end <= data_size:
            raise _corrupt(
                path,
                f"tensor {name!r} has data_offsets [{start}, {end}] outside the {data_size} data bytes (truncated?)",
            )
        info = TensorInfo(dtype, tuple(shape), (start, end))
        if end - start != info.size * SAFETENSORS_DTYPES[dtype][1]:
            raise _corrupt(path, f"tensor {name!r}: its {end - start} bytes do not match shape {shape} of {dtype}")
        tensors[name] = info
    return tensors


def _check_tensor_name(path: Path, name: str) -> None:
    """A tensor name is dot-separated non-empty segments of printable characters without spaces."""
    if len(name) > MAX_NAME_CHARS or name.count(".") >= MAX_NAME_SEGMENTS:
        raise _corrupt(path, f"tensor name {_short(name)} is too long")
    if not TENSOR_NAME.fullmatch(name):
        raise _corrupt(
            path, f"tensor name {name!r} is not dot-separated names (empty part, space or control character)"
        )


def _check_no_overlap(path: Path, tensors: dict[str, TensorInfo]) -> None:
    ordered = sorted((t.offsets, name) for name, t in tensors.items() if t.offsets[1] > t.offsets[0])
    for (first, name_a), (second, name_b) in zip(ordered, ordered[1:]):
        if second[0] < first[1]:
            raise _corrupt(path, f"tensors {name_a!r} and {name_b!r} share bytes (data_offsets overlap)")


def _counts(values: list) -> bool:
    """Whether every value is an integer from 0 to 2**62 (no bool, no float)."""
    return all(type(v) is int for v in values) and (not values or (min(values) >= 0 and max(values) < 1 << 62))


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
