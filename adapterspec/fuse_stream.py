"""Write the shards of a fuse plan front to back, merging a few chunks of modules ahead on parallel mlx streams."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import mlx.core as mx

from .fuse_io import ShardWriter, SourceFiles, SourceTensor
from .fuse_kernels import compute_chunk
from .fuse_plan import SHARD_METADATA, OutputTensor, Shard, Unit
from .fuse_progress import Progress

STREAMS = 2
CHUNK_BYTES = 48 << 20
IN_FLIGHT_BYTES = 2 * CHUNK_BYTES
CACHE_BYTES = 32 << 20
DELAY_ENV = "ADAPTERSPEC_FUSE_TEST_DELAY"


@dataclass(eq=False)
class Chunk:
    """Rows start:stop along the first axis of a unit's weight; `rows` is None when the chunk is the whole unit."""

    unit: Unit
    number: int
    rows: Optional[tuple[int, int]]
    working_bytes: int
    results: Optional[dict[str, mx.array]] = None


def chunks_of(unit: Unit, chunk_bytes: int) -> list[Chunk]:
    ranges = unit.row_chunks(chunk_bytes)
    if len(ranges) == 1:
        return [Chunk(unit, 0, None, unit.row_bytes * unit.logical_shape[0])]
    return [Chunk(unit, i, r, unit.row_bytes * (r[1] - r[0])) for i, r in enumerate(ranges)]


def read_array(files: SourceFiles, source: SourceTensor, rows: Optional[tuple[int, int]]) -> mx.array:
    """A source tensor, or its rows start:stop along the first axis, read by byte offset into an mx.array."""
    start, stop = rows or (0, source.shape[0])
    raw = mx.array(memoryview(files.read_slab(source, start, stop)))
    return raw.view(getattr(mx, source.dtype)).reshape((stop - start,) + tuple(source.shape[1:]))


class ChunkQueue:
    """Chunks submitted in output order while their working memory fits IN_FLIGHT_BYTES, alternating streams."""

    def __init__(self, units: list[Unit], adapters: dict[str, mx.array], files: SourceFiles, chunk_bytes: int = CHUNK_BYTES):
        self._chunks = [chunk for unit in units for chunk in chunks_of(unit, chunk_bytes)]
        self._by_unit: dict[int, list[Chunk]] = {}
        for chunk in self._chunks:
            self._by_unit.setdefault(id(chunk.unit), []).append(chunk)
        self._adapters = adapters
        self._files = files
        self._streams = [mx.new_stream(mx.default_device()) for _ in range(STREAMS)]
        self._next = 0
        self._in_flight: list[Chunk] = []

    def _submit(self) -> None:
        chunk = self._chunks[self._next]
        base = {param: read_array(self._files, source, chunk.rows) for param, source in chunk.unit.base.items()}
        with mx.stream(self._streams[self._next % len(self._streams)]):
            chunk.results = compute_chunk(chunk.unit, base, self._adapters, chunk.rows)
        mx.async_eval(*chunk.results.values())
        self._in_flight.append(chunk)
        self._next += 1

    def fill(self) -> None:
        """Submit chunks ahead while the memory they need fits (always at least one)."""
        while self._next < len(self._chunks):
            busy = sum(c.working_bytes for c in self._in_flight)
            if self._in_flight and busy + self._chunks[self._next].working_bytes > IN_FLIGHT_BYTES:
                return
            self._submit()

    def parts(self, tensor: OutputTensor) -> Iterator[mx.array]:
        """The evaluated, contiguous pieces of an output tensor, chunk after chunk."""
        for chunk in self._by_unit[id(tensor.unit)]:
            while chunk.results is None:
                self._submit()
            array = chunk.results.pop(tensor.name)
            chunk.working_bytes = sum(a.nbytes for a in chunk.results.values())
            if not chunk.results:
                self._in_flight.remove(chunk)
            self.fill()
            mx.eval(array)
            if not memoryview(array).c_contiguous:
                array = mx.contiguous(array)
                mx.eval(array)
            _check(tensor, array, chunk)
            yield array
            del array


def _check(tensor: OutputTensor, array: mx.array, chunk: Chunk) -> None:
    expected = tuple(tensor.shape)
    if chunk.rows is not None:
        expected = (chunk.rows[1] - chunk.rows[0],) + expected[1:]
    got = (str(array.dtype).rsplit(".", 1)[-1], tuple(array.shape))
    if got != (tensor.dtype, expected):
        raise RuntimeError(f"{tensor.name}: computed {got}, planned {(tensor.dtype, expected)}")


def _counted(parts: Iterator[mx.array], progress: Progress) -> Iterator[mx.array]:
    for part in parts:
        yield part
        progress.advance(part.nbytes)


def write_shards(
    shards: list[Shard],
    adapters: dict[str, mx.array],
    files: SourceFiles,
    out_dir: Path,
    progress: Optional[Progress] = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> None:
    """Write every shard into `out_dir`: copied tensors by byte range, computed ones chunk by chunk."""
    progress = progress or Progress()
    order: list[Unit] = []
    seen: set[int] = set()
    for shard in shards:
        for tensor in shard.tensors:
            if tensor.unit is not None and id(tensor.unit) not in seen:
                seen.add(id(tensor.unit))
                order.append(tensor.unit)
    queue = ChunkQueue(order, adapters, files, chunk_bytes)
    delay = float(os.environ.get(DELAY_ENV) or 0)
    previous_cache_limit = mx.set_cache_limit(CACHE_BYTES)
    progress.start(sum(s.nbytes for s in shards), len(shards))
    try:
        for number, shard in enumerate(shards, 1):
            progress.shard(number)
            writer = ShardWriter(out_dir / shard.filename, [(t.name, t.dtype, t.shape) for t in shard.tensors], SHARD_METADATA)
            try:
                for tensor in shard.tensors:
                    queue.fill()
                    if tensor.unit is None:
                        writer.copy(tensor.name, tensor.source, files)
                        progress.advance(tensor.nbytes)
                    else:
                        writer.write(tensor.name, _counted(queue.parts(tensor), progress))
                    if delay:
                        time.sleep(delay)
            except BaseException:
                writer.abort()
                raise
            writer.close()
    finally:
        progress.close()
        mx.set_cache_limit(previous_cache_limit)
