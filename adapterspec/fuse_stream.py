"""Write the shards of a fuse plan front to back, merging a few chunks of modules ahead on parallel mlx streams."""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import mlx.core as mx

from .fuse_io import ShardWriter, SourceFiles, SourceTensor
from .fuse_kernels import compute_chunk, merge_inputs, numpy_merges, outputs
from .fuse_plan import SHARD_METADATA, OutputTensor, Shard, Unit
from .fuse_progress import Progress

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

    A chunk whose merge runs in numpy goes through three steps: its merge inputs are computed on an mlx
    stream, merged on a worker thread (numpy releases the GIL; the worker waits for the inputs itself,
    so that the main thread goes on submitting and writing), and requantized on an mlx stream.
    """

    def __init__(self, units: list[Unit], adapters: dict[str, mx.array], files: SourceFiles, chunk_bytes: int = CHUNK_BYTES):
        self._chunks = [chunk for unit in units for chunk in chunks_of(unit, chunk_bytes)]
        self._by_unit: dict[int, list[Chunk]] = {}
        for chunk in self._chunks:
            self._by_unit.setdefault(id(chunk.unit), []).append(chunk)
        self._numpy = {id(unit): numpy_merges(unit) for unit in units}
        self._adapters = adapters
        self._files = files
        self._streams = [mx.new_stream(mx.default_device()) for _ in range(STREAMS)]
        self._workers = ThreadPoolExecutor(STREAMS) if any(self._numpy.values()) else None
        self._next = 0
        self._in_flight: list[Chunk] = []

    def close(self) -> None:
        if self._workers is not None:
            self._workers.shutdown(cancel_futures=True)

    def _submit(self) -> None:
        chunk = self._chunks[self._next]
        base = {param: read_array(self._files, source, chunk.rows) for param, source in chunk.unit.base.items()}
        chunk.stream = self._streams[self._next % len(self._streams)]
        with mx.stream(chunk.stream):
            if self._numpy[id(chunk.unit)]:
                inputs = merge_inputs(chunk.unit, base, self._adapters, chunk.rows)
                mx.async_eval(*inputs)
                chunk.merging = self._workers.submit(_merge, inputs, chunk.unit.adapter.scale, chunk.unit.dense_dtype)
            else:
                chunk.results = compute_chunk(chunk.unit, base, self._adapters, chunk.rows)
                mx.async_eval(*chunk.results.values())
        self._in_flight.append(chunk)
        self._next += 1

    def _advance(self, chunk: Chunk, wait: bool) -> None:
        """Requantize a numpy-merged chunk once merged (`wait`: wait for the merge)."""
        if chunk.merging is not None and (wait or chunk.merging.done()):
            merged = mx.array(chunk.merging.result())
            chunk.merging = None
            with mx.stream(chunk.stream):
                chunk.results = outputs(chunk.unit, merged)
            mx.async_eval(*chunk.results.values())

    def fill(self) -> None:
        """Submit chunks ahead while the memory they need fits (always at least one), and move merges on."""
        while self._next < len(self._chunks):
            busy = sum(c.working_bytes for c in self._in_flight)
            if self._in_flight and busy + self._chunks[self._next].working_bytes > IN_FLIGHT_BYTES:
                break
            self._submit()
        for chunk in self._in_flight:
            self._advance(chunk, wait=False)

    def parts(self, tensor: OutputTensor) -> Iterator[mx.array]:
        """The evaluated, contiguous pieces of an output tensor, chunk after chunk."""
        for chunk in self._by_unit[id(tensor.unit)]:
            while chunk.stream is None:
                self._submit()
            self._advance(chunk, wait=True)
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


def _merge(inputs: tuple[mx.array, ...], scale: float, dtype: str):
    """On a worker thread: wait for the merge inputs computing on their mlx stream, then merge them in numpy."""
    import numpy as np

    from .fuse_numpy import merge

    mx.eval(*inputs)
    return merge(*(np.asarray(x) for x in inputs), scale, dtype)


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
        queue.close()
        progress.close()
        mx.set_cache_limit(previous_cache_limit)
