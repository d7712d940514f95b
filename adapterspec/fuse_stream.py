"""Write the shards of a fuse plan front to back, merging a few chunks of modules ahead on parallel mlx streams."""

from __future__ import annotations

import os
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import mlx.core as mx

from .fuse_io import ShardWriter, SourceFiles, SourceTensor
from .fuse_kernels import compute_chunk, numpy_merges
from .fuse_numpy import Unrepresentable
from .fuse_plan import SHARD_METADATA, OutputTensor, Shard, Unit
from .fuse_progress import Progress
from .fuse_workers import MergeWorkers, task_for

STREAMS = 2
CHUNK_BYTES = 12 << 20
IN_FLIGHT_BYTES = 8 * CHUNK_BYTES
CACHE_BYTES = 32 << 20
DELAY_ENV = "ADAPTERSPEC_FUSE_TEST_DELAY"


@dataclass(eq=False)
class Chunk:
    """Rows start:stop along the first axis of a unit's weight; `rows` is None when the chunk is the whole unit.

    Once submitted it has its `stream`, and `results` or, while a worker merges it in numpy, `merging`.
    """

    unit: Unit
    number: int
    rows: Optional[tuple[int, int]]
    working_bytes: int
    stream: Optional[mx.Stream] = None
    merging: Optional[Future] = None
    results: Optional[dict[str, mx.array]] = None


def merge_workers_for(units: list[Unit]) -> Optional[MergeWorkers]:
    """Worker processes for the units that merge in numpy (None when there are none), started now."""
    return MergeWorkers() if any(numpy_merges(unit) for unit in units) else None


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
    """Chunks submitted in output order while their working memory fits IN_FLIGHT_BYTES, alternating streams.

    A chunk that merges in numpy goes to a worker process (`fuse_workers`), which reads its inputs; the
    main thread goes on submitting and writing. One that numpy cannot round as mlx does (an overflow)
    is computed by mlx instead.
    """

    def __init__(
        self,
        units: list[Unit],
        adapters: dict[str, mx.array],
        files: SourceFiles,
        chunk_bytes: int = CHUNK_BYTES,
        workers: Optional[MergeWorkers] = None,
    ):
        self._chunks = [chunk for unit in units for chunk in chunks_of(unit, chunk_bytes)]
        self._by_unit: dict[int, list[Chunk]] = {}
        for chunk in self._chunks:
            self._by_unit.setdefault(id(chunk.unit), []).append(chunk)
        self._numpy = {id(unit): numpy_merges(unit) for unit in units}
        self._adapters = adapters
        self._files = files
        self._streams = [mx.new_stream(mx.default_device()) for _ in range(STREAMS)]
        self._owns_workers = workers is None and any(self._numpy.values())
        self._workers = MergeWorkers() if self._owns_workers else workers
        self._next = 0
        self._in_flight: list[Chunk] = []

    def close(self) -> None:
        if self._owns_workers:
            self._workers.close()

    def _submit(self) -> None:
        chunk = self._chunks[self._next]
        chunk.stream = self._streams[self._next % len(self._streams)]
        if self._numpy[id(chunk.unit)] and self._workers is not None:
            chunk.merging = self._workers.submit(task_for(chunk.unit, chunk.rows))
        else:
            self._compute(chunk)
        self._in_flight.append(chunk)
        self._next += 1

    def _compute(self, chunk: Chunk) -> None:
        base = {param: read_array(self._files, source, chunk.rows) for param, source in chunk.unit.base.items()}
        with mx.stream(chunk.stream):
            chunk.results = compute_chunk(chunk.unit, base, self._adapters, chunk.rows)
            mx.async_eval(*chunk.results.values())

    def _advance(self, chunk: Chunk, wait: bool) -> None:
        """Take a numpy-merged chunk's results once merged (`wait`: wait for the merge)."""
        if chunk.merging is not None and (wait or chunk.merging.done()):
            merging, chunk.merging = chunk.merging, None
            try:
                chunk.results = merging.result()
            except Unrepresentable:
                self._compute(chunk)

    def fill(self) -> None:
        """Submit chunks ahead while the memory they need fits (always at least one), and move merges on."""
        while self._next < len(self._chunks):
            busy = sum(c.working_bytes for c in self._in_flight)
            if self._in_flight and busy + self._chunks[self._next].working_bytes > IN_FLIGHT_BYTES:
                break
            self._submit()
        for chunk in self._in_flight:
            self._advance(chunk, wait=False)

    def parts(self, tensor: OutputTensor) -> Iterator:
        """The evaluated, contiguous pieces of an output tensor (mx.arrays; numpy arrays from workers), chunk after chunk."""
        for chunk in self._by_unit[id(tensor.unit)]:
            while chunk.stream is None:
                self._submit()
            self._advance(chunk, wait=True)
            array = chunk.results.pop(tensor.name)
            chunk.working_bytes = sum(a.nbytes for a in chunk.results.values())
            if not chunk.results:
                self._in_flight.remove(chunk)
            self.fill()
            if isinstance(array, mx.array):
                mx.eval(array)
                if not memoryview(array).c_contiguous:
                    array = mx.contiguous(array)
                    mx.eval(array)
            _check(tensor, array, chunk)
            yield array
            del array


def _check(tensor: OutputTensor, array, chunk: Chunk) -> None:
    expected = tuple(tensor.shape)
    if chunk.rows is not None:
        expected = (chunk.rows[1] - chunk.rows[0],) + expected[1:]
    got = (str(array.dtype).rsplit(".", 1)[-1], tuple(array.shape))
    if got != (tensor.dtype, expected):
        raise RuntimeError(f"{tensor.name}: computed {got}, planned {(tensor.dtype, expected)}")


def _counted(parts: Iterator, progress: Progress) -> Iterator:
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
    workers: Optional[MergeWorkers] = None,
) -> None:
    """Write every shard into `out_dir`: copied tensors by byte range, computed ones chunk by chunk.

    Numpy merges run on `workers`, or on a pool started here when none is given.
    """
    progress = progress or Progress()
    order: list[Unit] = []
    seen: set[int] = set()
    for shard in shards:
        for tensor in shard.tensors:
            if tensor.unit is not None and id(tensor.unit) not in seen:
                seen.add(id(tensor.unit))
                order.append(tensor.unit)
    queue = ChunkQueue(order, adapters, files, chunk_bytes, workers)
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
        queue.close()
        progress.close()
        mx.set_cache_limit(previous_cache_limit)
