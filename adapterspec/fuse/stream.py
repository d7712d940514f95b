"""Write the shards of a fuse plan: laid out at once, then filled by worker processes, by mlx, and by byte-range copies.

Every output file gets its header and full size first, so each tensor's rows have a known place:
worker processes (`workers`) write the numpy merges there themselves, while the main thread
copies untouched tensors and writes what mlx merges, a few chunks ahead on parallel streams.
"""

from __future__ import annotations

import queue
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import mlx.core as mx

from ..errors import UserError
from .merge import numpy_merges
from .merge_mlx import compute_chunk
from .merge_numpy import Unrepresentable
from .plan import SHARD_METADATA, OutputTensor, Shard, Unit
from .progress import Progress
from .shards import ShardFile, SourceFiles, SourceTensor
from .workers import MergeWorkers, output_names, task_for

STREAMS = 2
CHUNK_BYTES = 12 << 20
IN_FLIGHT_BYTES = 8 * CHUNK_BYTES
# On a GPU every chunk is a round trip between host and device: at 12 MB a 4-bit 2.4 GB-class model took
# 3.4 s to write on an H200, at 96 MB 1.8 s. Host memory per chunk is the quarter that holds its input
# and output bytes.
GPU_CHUNK_BYTES = 96 << 20
GPU_IN_FLIGHT_BYTES = 4 * GPU_CHUNK_BYTES
CACHE_BYTES = 32 << 20


@dataclass(eq=False)
class Chunk:
    """Rows start:stop along the first axis of a unit's weight; `rows` is None when the chunk is the whole unit."""

    unit: Unit
    rows: Optional[tuple[int, int]]
    working_bytes: int
    results: Optional[dict[str, mx.array]] = None


def merge_workers_for(units: list[Unit]) -> Optional[MergeWorkers]:
    """Worker processes for the units that merge in numpy (None when there are none), started now."""
    return MergeWorkers() if any(numpy_merges(unit) for unit in units) else None


def chunks_of(unit: Unit, chunk_bytes: int) -> list[Chunk]:
    ranges = unit.row_chunks(chunk_bytes)
    if len(ranges) == 1:
        return [Chunk(unit, None, unit.row_bytes * unit.logical_shape[0])]
    return [Chunk(unit, r, unit.row_bytes * (r[1] - r[0])) for r in ranges]


def read_array(files: SourceFiles, source: SourceTensor, rows: Optional[tuple[int, int]]) -> mx.array:
    """A source tensor, or its rows start:stop along the first axis, read by byte offset into an mx.array."""
    start, stop = rows or (0, source.shape[0])
    raw = mx.array(memoryview(files.read_slab(source, start, stop)))
    return raw.view(getattr(mx, source.dtype)).reshape((stop - start,) + tuple(source.shape[1:]))


class Outputs:
    """The output shard files, laid out at once: where each output tensor's rows go, and what is written."""

    def __init__(self, shards: list[Shard], out_dir: Path):
        self.tensors: dict[str, OutputTensor] = {}
        self._files: list[ShardFile] = []
        self._file_of: dict[str, ShardFile] = {}
        try:
            for shard in shards:
                shard_file = ShardFile(
                    out_dir / shard.filename, [(t.name, t.dtype, t.shape) for t in shard.tensors], SHARD_METADATA
                )
                self._files.append(shard_file)
                for tensor in shard.tensors:
                    self.tensors[tensor.name] = tensor
                    self._file_of[tensor.name] = shard_file
        except BaseException:
            self.abort()
            raise

    def _start(self, name: str, rows: Optional[tuple[int, int]]) -> int:
        tensor = self.tensors[name]
        return 0 if rows is None else rows[0] * (tensor.nbytes // tensor.shape[0])

    def targets(self, names: tuple[str, ...], rows: Optional[tuple[int, int]]) -> tuple[tuple[str, int], ...]:
        """(file, absolute offset) of the given rows of each named tensor."""
        return tuple(self._file_of[name].target(name, self._start(name, rows)) for name in names)

    def write(self, name: str, rows: Optional[tuple[int, int]], data) -> None:
        self._file_of[name].write(name, self._start(name, rows), data)

    def written(self, name: str, nbytes: int) -> None:
        self._file_of[name].written(name, nbytes)

    def copy(self, tensor: OutputTensor, files: SourceFiles) -> None:
        self._file_of[tensor.name].copy(tensor.name, tensor.source, files)

    def close(self) -> None:
        """Close every file, checking that each tensor was written completely."""
        try:
            for shard_file in self._files:
                shard_file.close()
        finally:
            self.abort()

    def abort(self) -> None:
        for shard_file in self._files:
            shard_file.abort()


class MlxChunks:
    """Chunks merged by mlx, submitted in order on alternating streams while their working memory fits."""

    def __init__(self, chunks: list[Chunk], adapters: dict[str, mx.array], files: SourceFiles, in_flight_bytes: int):
        self._chunks = chunks
        self._adapters = adapters
        self._files = files
        self._in_flight_bytes = in_flight_bytes
        self._streams = [mx.new_stream(mx.default_device()) for _ in range(STREAMS)]
        self._next = 0
        self._in_flight: list[Chunk] = []

    def compute(self, chunk: Chunk, stream: Optional[mx.Stream] = None) -> None:
        """Start computing a chunk (lazy until evaluated)."""
        base = {param: read_array(self._files, source, chunk.rows) for param, source in chunk.unit.base.items()}
        with mx.stream(stream or self._streams[0]):
            chunk.results = compute_chunk(chunk.unit, base, self._adapters, chunk.rows)
            mx.async_eval(*chunk.results.values())

    def _fill(self) -> None:
        while self._next < len(self._chunks):
            busy = sum(c.working_bytes for c in self._in_flight)
            if self._in_flight and busy + self._chunks[self._next].working_bytes > self._in_flight_bytes:
                break
            chunk = self._chunks[self._next]
            self.compute(chunk, self._streams[self._next % len(self._streams)])
            self._in_flight.append(chunk)
            self._next += 1

    def __iter__(self) -> Iterator[tuple[Chunk, dict]]:
        """(chunk, its evaluated, contiguous output arrays by name), chunk after chunk."""
        while self._next < len(self._chunks) or self._in_flight:
            self._fill()
            chunk = self._in_flight.pop(0)
            yield chunk, evaluated(chunk)
            chunk.results = None


def evaluated(chunk: Chunk) -> dict:
    """A computed chunk's output arrays, evaluated, contiguous and checked against the plan."""
    results = {}
    for name, array in chunk.results.items():
        mx.eval(array)
        if not memoryview(array).c_contiguous:
            array = mx.contiguous(array)
            mx.eval(array)
        results[name] = array
    return results


def _check(tensor: OutputTensor, array, chunk: Chunk) -> None:
    expected = tuple(tensor.shape)
    if chunk.rows is not None:
        expected = (chunk.rows[1] - chunk.rows[0],) + expected[1:]
    got = (str(array.dtype).rsplit(".", 1)[-1], tuple(array.shape))
    if got != (tensor.dtype, expected):
        raise RuntimeError(f"{tensor.name}: computed {got}, planned {(tensor.dtype, expected)}")


def _check_finite(name: str, array) -> None:
    """A fused tensor holding NaN or Inf (the merge overflowed the weight's dtype) is an error, never a written file."""
    if mx.issubdtype(array.dtype, mx.floating) and not mx.all(mx.isfinite(array)).item():
        raise UserError(
            f"fusing gives NaN or infinite values in '{name}' (the merged weights do not fit {array.dtype})",
            help="check the adapters' scale and weights, or fuse into a float32 copy of the model",
        )


class _Writing:
    """The state of one write_shards call: where outputs go, the worker merges not yet counted, the progress shown."""

    def __init__(self, outputs: Outputs, mlx_chunks: MlxChunks, progress: Progress):
        self.outputs = outputs
        self.mlx_chunks = mlx_chunks
        self.progress = progress
        self.pending = 0
        self._finished: queue.SimpleQueue = queue.SimpleQueue()

    def submitted(self, future: Future, chunk: Chunk) -> None:
        self.pending += 1
        future.add_done_callback(lambda done: self._finished.put((done, chunk)))

    def write_results(self, chunk: Chunk, results: dict) -> None:
        for name, array in results.items():
            _check(self.outputs.tensors[name], array, chunk)
            _check_finite(name, array)
            self.outputs.write(name, chunk.rows, array)
            self.progress.advance(array.nbytes)

    def collect(self, block: bool) -> None:
        """Count the worker merges that finished (`block`: wait for all); mlx computes those numpy cannot round."""
        while self.pending:
            try:
                future, chunk = self._finished.get(block=block)
            except queue.Empty:
                return
            self.pending -= 1
            try:
                written = future.result()
            except Unrepresentable:
                self.mlx_chunks.compute(chunk)
                self.write_results(chunk, evaluated(chunk))
                chunk.results = None
                continue
            for name, nbytes in written.items():
                self.outputs.written(name, nbytes)
                self.progress.advance(nbytes)

    def step(self) -> None:
        """Between two pieces of main-thread work: take in finished merges."""
        self.collect(block=False)


def write_shards(
    shards: list[Shard],
    adapters: dict[str, mx.array],
    files: SourceFiles,
    out_dir: Path,
    progress: Optional[Progress] = None,
    chunk_bytes: Optional[int] = None,
    workers: Optional[MergeWorkers] = None,
) -> None:
    """Write every shard into `out_dir`: copied tensors by byte range, computed ones chunk by chunk.

    The units that merge in numpy run on `workers` (`merge_workers_for`); without workers, mlx merges every unit.
    """
    progress = progress or Progress()
    on_cpu = mx.default_device() == mx.cpu
    chunk_bytes = chunk_bytes or (CHUNK_BYTES if on_cpu else GPU_CHUNK_BYTES)
    units = list({id(t.unit): t.unit for shard in shards for t in shard.tensors if t.unit is not None}.values())
    in_numpy = [unit for unit in units if numpy_merges(unit)] if workers is not None else []
    numpy_ids = {id(unit) for unit in in_numpy}
    by_mlx = [chunk for unit in units if id(unit) not in numpy_ids for chunk in chunks_of(unit, chunk_bytes)]
    previous_cache_limit = mx.set_cache_limit(CACHE_BYTES)
    progress.start(sum(s.nbytes for s in shards), len(shards))
    failed, outputs = True, None
    try:
        outputs = Outputs(shards, out_dir)
        writing = _Writing(
            outputs, MlxChunks(by_mlx, adapters, files, IN_FLIGHT_BYTES if on_cpu else GPU_IN_FLIGHT_BYTES), progress
        )
        for unit in in_numpy:
            for chunk in chunks_of(unit, chunk_bytes):
                targets = outputs.targets(output_names(unit), chunk.rows)
                writing.submitted(workers.submit(task_for(unit, chunk.rows, targets)), chunk)
        for number, shard in enumerate(shards, 1):
            progress.shard(number)
            for tensor in shard.tensors:
                if tensor.unit is None:
                    outputs.copy(tensor, files)
                    progress.advance(tensor.nbytes)
                    writing.step()
        for chunk, results in writing.mlx_chunks:
            writing.write_results(chunk, results)
            writing.step()
        writing.collect(block=True)
        outputs.close()
        failed = False
    finally:
        if failed and outputs is not None:
            outputs.abort()
        progress.close()
        mx.set_cache_limit(previous_cache_limit)
