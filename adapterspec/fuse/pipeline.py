"""The chunks mlx merges, as a pipeline: inputs read ahead on a thread, merged on the device a few chunks deep,
outputs written by two threads, all within one bound on the bytes in flight.

On a GPU each chunk goes to the device and back; reading the next chunk and writing the previous ones
while the device merges this one keeps the fuse near the time of reading and writing its files.
On the CPU the same pipeline runs the merges that the worker processes do not take. Only the calling
thread runs mlx operations (its streams belong to the thread that made them): the reading thread hands
over arrays of the bytes it read (a copy into mlx's memory, no operation), the writing threads receive
buffers of evaluated arrays.
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx

from ..errors import UserError
from .host_pages import prefetcher
from .merge_cuda import compute_chunk
from .plan import Unit
from .shards import SourceFiles

STREAMS = 2
# Writing threads: copying a chunk's bytes into the page cache, from the device's memory on a GPU, runs at a few
# GB/s per thread; one thread made the writes the longest stage of a float16 fuse on an H100 host.
WRITERS = 2
# Chunks submitted to the device before the oldest is waited for.
DEPTH = 3


@dataclass(frozen=True)
class Output:
    """One evaluated output tensor of a chunk: its bytes (a buffer of the mlx array, which it keeps alive), dtype
    name and shape."""

    data: memoryview
    dtype: str
    shape: tuple[int, ...]


@dataclass(eq=False)
class Chunk:
    """Rows start:stop along the first axis of a unit's weight; `rows` is None when the chunk is the whole unit."""

    unit: Unit
    rows: Optional[tuple[int, int]]
    working_bytes: int
    results: Optional[dict[str, mx.array]] = field(default=None, repr=False)
    finite: Optional[mx.array] = field(default=None, repr=False)


def read_bytes(files: SourceFiles, chunk: Chunk) -> dict[str, bytes]:
    """The bytes of a chunk's input tensors (its rows of each)."""
    return {param: files.read_slab(source, *(chunk.rows or (0, source.shape[0])))
            for param, source in chunk.unit.base.items()}  # fmt: skip


def as_arrays(chunk: Chunk, raw: dict[str, mx.array]) -> dict[str, mx.array]:
    """A chunk's input tensors from their bytes (`read_raw`): each source's dtype and shape, its rows of the first
    axis."""
    tensors = {}
    for param, source in chunk.unit.base.items():
        start, stop = chunk.rows or (0, source.shape[0])
        array = raw[param].view(getattr(mx, source.dtype))
        tensors[param] = array.reshape((stop - start,) + tuple(source.shape[1:]))
    return tensors


def read_raw(files: SourceFiles, chunk: Chunk) -> dict[str, mx.array]:
    """A chunk's input bytes copied into mlx arrays of bytes: an allocation and a copy, no operation, so any thread may
    make them (the operations that view them as tensors run on the thread that evaluates them)."""
    return {param: mx.array(memoryview(data)) for param, data in read_bytes(files, chunk).items()}


def submit(chunk: Chunk, raw: dict[str, mx.array], adapters: dict[str, mx.array], stream: mx.Stream) -> None:
    """Start merging a chunk on `stream`: its outputs and whether they are all finite, evaluated asynchronously."""
    with mx.stream(stream):
        chunk.results = compute_chunk(chunk.unit, as_arrays(chunk, raw), adapters, chunk.rows)
        floating = [a for a in chunk.results.values() if mx.issubdtype(a.dtype, mx.floating)]
        chunk.finite = mx.all(mx.stack([mx.all(mx.isfinite(a)) for a in floating])) if floating else mx.array(True)
        mx.async_eval(chunk.finite, *chunk.results.values())


def evaluated(chunk: Chunk) -> dict[str, Output]:
    """A submitted chunk's outputs, evaluated and C-contiguous."""
    results = {}
    for name, array in chunk.results.items():
        mx.eval(array)
        if not memoryview(array).c_contiguous:
            array = mx.contiguous(array)
            mx.eval(array)
        results[name] = Output(memoryview(array), str(array.dtype).rsplit(".", 1)[-1], tuple(array.shape))
    return results


def non_finite_error(name: str) -> UserError:
    """A fused tensor holding NaN or Inf (the merge overflowed the weight's dtype) is an error, never a written file."""
    return UserError(
        f"fusing gives NaN or infinite values in '{name}' (the merged weights do not fit its dtype)",
        help="check the adapters' scale and weights, or fuse into a float32 copy of the model",
    )


class Budget:
    """Bytes in flight across the pipeline's stages; a chunk waits until it fits (one chunk always fits)."""

    def __init__(self, limit: int):
        self._limit = limit
        self._used = 0
        self._changed = threading.Condition()

    def take(self, nbytes: int, stop: threading.Event) -> bool:
        with self._changed:
            while self._used and self._used + nbytes > self._limit:
                if stop.is_set():
                    return False
                self._changed.wait(0.1)
            self._used += nbytes
            return not stop.is_set()

    def give(self, nbytes: int) -> None:
        with self._changed:
            self._used -= nbytes
            self._changed.notify_all()


class Pipeline:
    """Merge `chunks` in order and hand each chunk's evaluated outputs to `write` on the writing thread.

    `between` runs on the calling thread between two steps (taking in what other merges finished). The
    first error of any stage stops the others and is raised here; nothing is left running.
    """

    def __init__(
        self,
        chunks: list[Chunk],
        adapters: dict[str, mx.array],
        files: SourceFiles,
        in_flight_bytes: int,
        write: Callable[[Chunk, dict[str, Output]], None],
    ):
        self._chunks = chunks
        self._adapters = adapters
        self._files = files
        self._write = write
        self._budget = Budget(in_flight_bytes)
        self._stop = threading.Event()
        self._streams = [mx.new_stream(mx.default_device()) for _ in range(STREAMS)]

    def compute_now(self, chunk: Chunk) -> dict[str, Output]:
        """One chunk merged at once, outside the pipeline (a row the worker processes could not round)."""
        submit(chunk, read_raw(self._files, chunk), self._adapters, self._streams[0])
        return self._finish(chunk)

    def _finish(self, chunk: Chunk) -> dict[str, Output]:
        results = evaluated(chunk)
        finite = bool(chunk.finite.item())
        floating = [name for name, array in chunk.results.items() if mx.issubdtype(array.dtype, mx.floating)]
        chunk.results = chunk.finite = None
        if not finite:
            raise non_finite_error(floating[0])
        return results

    def run(self, between: Callable[[], None] = lambda: None) -> None:
        if not self._chunks:
            return
        reader = ThreadPoolExecutor(1, thread_name_prefix="fuse-read")
        writer = ThreadPoolExecutor(WRITERS, thread_name_prefix="fuse-write")
        reads: collections.deque[Future] = collections.deque(reader.submit(self._read, chunk) for chunk in self._chunks)
        on_device: collections.deque[Chunk] = collections.deque()
        writes: collections.deque[Future] = collections.deque()

        def write_oldest() -> None:
            done = on_device.popleft()
            writes.append(writer.submit(self._write_and_release, done, self._finish(done)))

        try:
            for number, chunk in enumerate(self._chunks):
                read = reads.popleft()
                # A read may wait for bytes that only the chunks on the device give back once written.
                while on_device and not read.done():
                    write_oldest()
                submit(chunk, read.result(), self._adapters, self._streams[number % STREAMS])
                on_device.append(chunk)
                while len(on_device) > DEPTH or (on_device and not reads):
                    write_oldest()
                while writes and writes[0].done():
                    writes.popleft().result()
                between()
            for future in writes:
                future.result()
        finally:
            self._stop.set()
            for future in reads:
                future.cancel()
            reader.shutdown(wait=True)
            writer.shutdown(wait=True, cancel_futures=True)

    def _read(self, chunk: Chunk) -> dict[str, mx.array]:
        if not self._budget.take(chunk.working_bytes, self._stop):
            raise Stopped()
        return read_raw(self._files, chunk)

    def _write_and_release(self, chunk: Chunk, results: dict[str, Output]) -> None:
        try:
            pages = prefetcher()
            if pages is not None:
                for output in results.values():
                    pages.to_host(output.data)
            self._write(chunk, results)
        finally:
            self._budget.give(chunk.working_bytes)


class Stopped(Exception):
    """A read cancelled because the pipeline stopped."""
