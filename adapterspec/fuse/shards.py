"""Streaming safetensors I/O for fuse: tensors located by byte offset, shard writers, sampled row reads."""

from __future__ import annotations

import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..model.safetensors import encode_header, nbytes_of, read_safetensors_header

COPY_CHUNK = 64 << 20
MAX_WRITE = 1 << 30


@dataclass(frozen=True)
class SourceTensor:
    """A tensor inside a safetensors file: mlx dtype name, shape, absolute byte offset and length."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    parts: tuple["SourceTensor", ...] = ()

    @property
    def rows(self) -> int:
        """The number of rows: the product of every axis but the last."""
        return math.prod(self.shape[:-1])

    def slab_ranges(self, start: int, stop: int) -> list[tuple[Path, int, int]]:
        """(file, absolute offset, length) of the bytes of self[start:stop] along the first axis, in order.

        A stacked tensor (Hugging Face per-expert tensors, see `model.hf_moe`) has one part per expert."""
        if self.parts:
            return [(p.path, p.offset, p.nbytes) for p in self.parts[start:stop]]
        step = self.nbytes // max(self.shape[0], 1) if self.shape else self.nbytes
        return [(self.path, self.offset + start * step, (stop - start) * step)]


def stacked_source(name: str, parts: Sequence[SourceTensor]) -> SourceTensor:
    """The tensor mlx-lm's sanitize makes by stacking `parts` (one per expert) along a new first axis."""
    first = parts[0]
    shape = (len(parts),) + tuple(first.shape)
    return SourceTensor(name, first.path, first.dtype, shape, first.offset, sum(p.nbytes for p in parts), tuple(parts))


def read_sources(path: str | os.PathLike) -> dict[str, SourceTensor]:
    """Every tensor of a safetensors file, in the order of its bytes in the file."""
    path = Path(path)
    tensors = read_safetensors_header(path)
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    data_start = 8 + header_len
    ordered = sorted(tensors.items(), key=lambda item: item[1].offsets[0])  # overlaps are refused by the header
    return {
        name: SourceTensor(name, path, t.dtype_name, t.shape, data_start + t.offsets[0], t.offsets[1] - t.offsets[0])
        for name, t in ordered
    }


class SourceFiles:
    """Read-only file descriptors of the input files, opened once each (from any thread)."""

    def __init__(self):
        self._fds: dict[Path, int] = {}
        self._opening = threading.Lock()  # reading threads of the fuse ask for descriptors too

    def fd(self, path: Path) -> int:
        with self._opening:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "SourceFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read_slab(self, source: SourceTensor, start: int, stop: int) -> bytes:
        """The bytes of source[start:stop] along its first axis."""
        ranges = source.slab_ranges(start, stop)
        return b"".join(pread_all(self.fd(path), length, offset) for path, offset, length in ranges)

    def read_rows(self, source: SourceTensor, rows: Sequence[int]) -> bytes:
        """The bytes of some rows (indices over all but the last axis, ascending) of a tensor."""
        if source.parts:
            per_part = max(source.parts[0].rows, 1)
            by_part: dict[int, list[int]] = {}
            for row in rows:
                by_part.setdefault(row // per_part, []).append(row % per_part)
            return b"".join(self.read_rows(source.parts[p], inner) for p, inner in by_part.items())
        row_bytes = source.nbytes // max(source.rows, 1)
        fd = self.fd(source.path)
        chunks = []
        start = 0
        while start < len(rows):
            end = start
            while end + 1 < len(rows) and rows[end + 1] == rows[end] + 1:
                end += 1
            chunks.append(pread_all(fd, (end - start + 1) * row_bytes, source.offset + rows[start] * row_bytes))
            start = end + 1
        return b"".join(chunks)


class ShardFile:
    """One safetensors file laid out at once (header written, full size set), its tensors written by position.

    Any process may fill a tensor's bytes (`target`), in any order; the owner counts what was reported
    written and `close` checks that every tensor is complete.
    """

    def __init__(self, path: Path, entries: Sequence[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]):
        self.path = path
        header = encode_header(entries, metadata)
        self._spans: dict[str, tuple[int, int]] = {}
        offset = len(header)
        for name, dtype, shape in entries:
            size = nbytes_of(dtype, shape)
            self._spans[name] = (offset, size)
            offset += size
        self._missing = {name: size for name, (_, size) in self._spans.items()}
        self._counting = threading.Lock()  # several threads may write rows of one tensor
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        pwrite_all(self._fd, header, 0)
        os.ftruncate(self._fd, offset)

    def target(self, name: str, start: int = 0) -> tuple[str, int]:
        """(path, absolute offset) of byte `start` of tensor `name`."""
        return str(self.path), self._spans[name][0] + start

    def write(self, name: str, start: int, data) -> None:
        """Write a C-contiguous buffer (an evaluated mx.array, a numpy array, bytes) at byte `start` of a tensor."""
        view = memoryview(data).cast("B")
        offset, size = self._spans[name]
        if start + view.nbytes > size:
            raise RuntimeError(
                f"{self.path.name}: {view.nbytes} bytes at {start} overrun tensor {name!r} of {size} bytes"
            )
        pwrite_all(self._fd, view, offset + start)
        self.written(name, view.nbytes)

    def written(self, name: str, nbytes: int) -> None:
        """Count bytes of a tensor written (here or by another process through `target`)."""
        with self._counting:
            self._missing[name] -= nbytes

    def copy(self, name: str, source: SourceTensor, files: SourceFiles) -> None:
        """Fill a tensor by copying its bytes from an input file, without reading them into this process."""
        offset, size = self._spans[name]
        if size != source.nbytes:
            raise RuntimeError(
                f"{self.path.name}: tensor {name!r} has {size} bytes in the header, {source.nbytes} in {source.path.name}"
            )
        for path, start, length in source.slab_ranges(0, source.shape[0] if source.shape else 1):
            copy_range(files.fd(path), self._fd, start, length, offset)
            offset += length
        self.written(name, size)

    def close(self) -> None:
        try:
            incomplete = [name for name, missing in self._missing.items() if missing]
            if incomplete:
                raise RuntimeError(
                    f"{self.path.name}: {len(incomplete)} tensor(s) not completely written, e.g. {incomplete[0]!r}"
                )
        finally:
            self.abort()

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class ShardWriter:
    """One safetensors file written front to back: the header, then every tensor's bytes in header order."""

    def __init__(self, path: Path, entries: Sequence[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]):
        self.path = path
        self._file = ShardFile(path, entries, metadata)
        self._names = [name for name, _, _ in entries]
        self._next = 0

    def write(self, name: str, parts: Iterable) -> None:
        """Write a tensor from C-contiguous buffers (evaluated mx.arrays, bytes) that follow each other in it."""
        if self._next >= len(self._names) or self._names[self._next] != name:
            expected = self._names[self._next] if self._next < len(self._names) else "nothing"
            raise RuntimeError(f"{self.path.name}: tensor {name!r} written out of order (expected {expected})")
        start = 0
        for part in parts:
            self._file.write(name, start, part)
            start += memoryview(part).nbytes
        self._next += 1

    def close(self) -> None:
        self._file.close()

    def abort(self) -> None:
        self._file.abort()


def pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        written = os.pwrite(fd, view[:MAX_WRITE], offset)
        view = view[written:]
        offset += written


def pread_all(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            raise OSError(f"unexpected end of file reading {length} bytes at offset {offset}")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int, dst_offset: int) -> None:
    """Copy `length` bytes from `src_fd` at `offset` to `dst_fd` at `dst_offset`: in the kernel where it can, else by chunks."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < length:
                n = os.copy_file_range(src_fd, dst_fd, length - done, offset + done, dst_offset + done)
                if n == 0:
                    break
                done += n
        except OSError:
            pass
    while done < length:
        chunk = pread_all(src_fd, min(COPY_CHUNK, length - done), offset + done)
        pwrite_all(dst_fd, chunk, dst_offset + done)
        done += len(chunk)
