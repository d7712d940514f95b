"""Write the shards of a fuse plan: laid out at once, then filled by worker processes, by mlx, and by byte-range copies.

Every output file gets its header and full size first, so each tensor's rows have a known place:
worker processes (`workers`) write the numpy merges there themselves, a thread copies untouched
tensors, and the rest is merged by mlx (on the GPU where there is one) through `pipeline`.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .merge import merges_on_workers
from .merge_numpy import Unrepresentable
from .pipeline import Chunk, Output, Pipeline
from .plan import SHARD_METADATA, OutputTensor, Shard, Unit
from .progress import Progress
from .shards import ShardFile, SourceFiles
from .workers import MergeWorkers, output_names, task_for

CHUNK_BYTES = 12 << 20
IN_FLIGHT_BYTES = 8 * CHUNK_BYTES
# On a GPU every chunk is a round trip between host and device: at 12 MB a 4-bit 2.4 GB-class model took
# 3.4 s to write on an H200, at 96 MB 1.8 s. Host memory per chunk is the quarter that holds its input
# and output bytes.
GPU_CHUNK_BYTES = 96 << 20
GPU_IN_FLIGHT_BYTES = 4 * GPU_CHUNK_BYTES
CACHE_BYTES = 32 << 20
# A GPU keeps a chunk's worth of freed buffers for the next chunks instead of returning them to the driver.
GPU_CACHE_BYTES = 2 * GPU_CHUNK_BYTES


def merge_workers_for(units: list[Unit], device: str) -> Optional[MergeWorkers]:
    """Worker processes for the units that merge in numpy (None when there are none), started now."""
    return MergeWorkers() if any(merges_on_workers(unit, device) for unit in units) else None


def chunks_of(unit: Unit, chunk_bytes: int) -> list[Chunk]:
    ranges = unit.row_chunks(chunk_bytes)
    if len(ranges) == 1:
        return [Chunk(unit, None, unit.row_bytes * unit.logical_shape[0])]
    return [Chunk(unit, r, unit.row_bytes * (r[1] - r[0])) for r in ranges]


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


def _check(tensor: OutputTensor, output: Output, chunk: Chunk) -> None:
    expected = tuple(tensor.shape)
    if chunk.rows is not None:
        expected = (chunk.rows[1] - chunk.rows[0],) + expected[1:]
    got = (output.dtype, output.shape)
    if got != (tensor.dtype, expected):
        raise RuntimeError(f"{tensor.name}: computed {got}, planned {(tensor.dtype, expected)}")


class _Writing:
    """The state of one write_shards call: where outputs go, the worker merges not yet counted, the progress shown.

    Results are written from the pipeline's writing thread and from this one, so progress is advanced under a lock.
    """

    def __init__(self, outputs: Outputs, progress: Progress):
        self.outputs = outputs
        self.progress = progress
        self.pipeline: Optional[Pipeline] = None
        self.pending = 0
        self._finished: queue.SimpleQueue = queue.SimpleQueue()
        self._progress_lock = threading.Lock()

    def advance(self, nbytes: int) -> None:
        with self._progress_lock:
            self.progress.advance(nbytes)

    def submitted(self, future: Future, chunk: Chunk) -> None:
        self.pending += 1
        future.add_done_callback(lambda done: self._finished.put((done, chunk)))

    def write_results(self, chunk: Chunk, results: dict[str, Output]) -> None:
        for name, output in results.items():
            _check(self.outputs.tensors[name], output, chunk)
            self.outputs.write(name, chunk.rows, output.data)
            self.advance(output.data.nbytes)

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
                self.write_results(chunk, self.pipeline.compute_now(chunk))
                continue
            for name, nbytes in written.items():
                self.outputs.written(name, nbytes)
                self.advance(nbytes)

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
    device: str = "cpu",
) -> None:
    """Write every shard into `out_dir`: copied tensors by byte range, computed ones chunk by chunk.

    On the CPU the units that merge in numpy run on `workers` (`merge_workers_for`); mlx merges the rest, and
    every unit when there are no workers or the device is the GPU (`merge.resolve_device`).
    """
    progress = progress or Progress()
    on_gpu = device == "gpu"
    chunk_bytes = chunk_bytes or (GPU_CHUNK_BYTES if on_gpu else CHUNK_BYTES)
    units = list({id(t.unit): t.unit for shard in shards for t in shard.tensors if t.unit is not None}.values())
    in_numpy = [unit for unit in units if merges_on_workers(unit, device)] if workers is not None else []
    numpy_ids = {id(unit) for unit in in_numpy}
    by_mlx = [chunk for unit in units if id(unit) not in numpy_ids for chunk in chunks_of(unit, chunk_bytes)]
    previous_cache_limit = mx.set_cache_limit(GPU_CACHE_BYTES if on_gpu else CACHE_BYTES)
    progress.start(sum(s.nbytes for s in shards), len(shards))
    failed, outputs = True, None
    try:
        outputs = Outputs(shards, out_dir)
        writing = _Writing(outputs, progress)
        writing.pipeline = Pipeline(
            by_mlx, adapters, files, GPU_IN_FLIGHT_BYTES if on_gpu else IN_FLIGHT_BYTES, writing.write_results
        )
        for unit in in_numpy:
            for chunk in chunks_of(unit, chunk_bytes):
                targets = outputs.targets(output_names(unit), chunk.rows)
                writing.submitted(workers.submit(task_for(unit, chunk.rows, targets)), chunk)
        with ThreadPoolExecutor(1, thread_name_prefix="fuse-copy") as copier:
            # Untouched tensors are copied by the kernel while the merges run.
            copies = [copier.submit(_copy, outputs, tensor, files, writing) for s in shards for tensor in s.tensors
                      if tensor.unit is None]  # fmt: skip
            try:
                writing.pipeline.run(between=writing.step)
                for future in copies:
                    future.result()
            except BaseException:
                for future in copies:
                    future.cancel()
                raise
        writing.collect(block=True)
        outputs.close()
        failed = False
    finally:
        if failed and outputs is not None:
            outputs.abort()
        progress.close()
        mx.set_cache_limit(previous_cache_limit)


def _copy(outputs: Outputs, tensor: OutputTensor, files: SourceFiles, writing: _Writing) -> None:
    outputs.copy(tensor, files)
    writing.advance(tensor.nbytes)
