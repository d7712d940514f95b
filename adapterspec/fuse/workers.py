"""Worker processes that merge LoRA into weights and measure its erasure in numpy (compiled kernels or numpy's loops),
reading and writing the files themselves; this module is the fuse's side of them, `worker_process` theirs.

Processes, not threads: the merge is a few dozen short numpy calls per tile, and between them a
thread needs the GIL back; two threads of it ran 1.15× one thread's speed on two cores, two
processes 2×. Each worker is `python -m adapterspec.fuse.worker_process`, fed pickled tasks on its stdin
and answering on its stdout, so nothing of the caller's program is imported again (multiprocessing's
spawn would re-run an unguarded script). A merge task names byte ranges: of the input files (a chunk of
rows, the adapter tensors) and of the output shards, laid out beforehand, where the worker writes
the merged rows; only a count of bytes comes back. A measure task names units, whose sampled rows the worker
reads; their Measurements come back. Workers import numpy, `merge_numpy` and `merge_native`, never mlx, and
neither does this module: a fuse on a GPU, whose workers only measure, loads no numpy. Workers ignore SIGINT,
and exit when their stdin closes (the parent ended, or was killed).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import subprocess
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from ..errors import EXIT_ERRORS, UserError
from ..processes import python_module
from .shards import SourceTensor

if TYPE_CHECKING:
    from .plan import Unit

MAX_WORKERS = 8
# Each worker holds a chunk and an interpreter (~40 MB): more than this only costs memory.
MAX_WORKERS_GIVEN = 64
WORKERS_ENV = "ADAPTERSPEC_FUSE_WORKERS"
CLOSE_TIMEOUT = 10.0
MAX_MEASURING_WORKERS = 4


@dataclass(frozen=True)
class MergeTask:
    """Rows start:stop of a plain LoRA unit: where its tensors are, how to merge, and where the outputs' rows go.

    `quantization` is (bits, group_size) of an affine-quantized base, None for a dense one. `targets` holds,
    per output name, the (file, absolute offset) its rows' bytes are written at; without targets the
    arrays are returned instead.
    """

    base: tuple[tuple[str, SourceTensor], ...]
    lora_a: SourceTensor
    lora_b: SourceTensor
    rows: tuple[int, int]
    scale: float
    quantization: Optional[tuple[int, int]]
    requantize: bool
    names: tuple[str, ...]
    targets: tuple[tuple[str, int], ...] = ()
    grid: bool = False


@dataclass(frozen=True)
class MeasureTask:
    """The erasure measure of a batch of plain LoRA units (`numpy_scope.numpy_batches`) on `limit` sampled rows each."""

    units: tuple[Unit, ...]
    limit: int


def measuring_workers() -> int:
    """Worker processes for the erasure measure alone (a fuse on a GPU): a quarter of the cores, at most four; one on
    a small machine."""
    return max(1, min(MAX_MEASURING_WORKERS, (os.cpu_count() or 1) // 4))


def task_for(unit, rows: Optional[tuple[int, int]], targets: tuple[tuple[str, int], ...] = ()) -> MergeTask:
    """The task merging rows (all when None) of a plain LoRA unit (a plan.Unit that `merge.numpy_merges`)."""
    q = unit.quantization
    return MergeTask(
        tuple(unit.base.items()), unit.adapter_tensors["lora_a"], unit.adapter_tensors["lora_b"],
        rows or (0, unit.logical_shape[0]), float(unit.adapter.scale), None if q is None else (q.bits, q.group_size),
        unit.requantize, output_names(unit), targets, unit.requantization == "grid",
    )  # fmt: skip


def output_names(unit) -> tuple[str, ...]:
    """The names of the tensors a unit's merge writes, in the order the merge gives them."""
    params = ("weight", "scales", "biases") if unit.quantization is not None and unit.requantize else ("weight",)
    return tuple(f"{unit.path}.{param}" for param in params)


def worker_count() -> int:
    """ADAPTERSPEC_FUSE_WORKERS (1 … 64), or one per core: at least two, so that merging goes on while a result
    is written, and at most MAX_WORKERS."""
    given = os.environ.get(WORKERS_ENV, "").strip()
    if not given:
        return max(2, min(os.cpu_count() or 1, MAX_WORKERS))
    if not given.isdigit() or not 1 <= int(given) <= MAX_WORKERS_GIVEN:
        raise UserError(
            f"{WORKERS_ENV}={given!r} is not a number of worker processes from 1 to {MAX_WORKERS_GIVEN}",
            help=f"unset it for one per core, or set it to a whole number such as {max(2, os.cpu_count() or 1)}",
        )
    return int(given)


class WorkerFailed(UserError):
    """A worker process ended without answering (killed, out of memory)."""

    def __init__(self, detail: str):
        super().__init__(f"a fuse worker process ended unexpectedly ({detail}); nothing was written",
                         help="if the system ran out of memory, fuse with fewer workers: ADAPTERSPEC_FUSE_WORKERS=1",
                         exit_code=EXIT_ERRORS)  # fmt: skip


class MergeWorkers:
    """Worker processes, started at once; `submit` gives a Future of a task's output arrays.

    Closed normally, each worker reports its peak resident memory (`peak_rss`) and exits.
    """

    def __init__(self, workers: Optional[int] = None):
        self.workers = workers or worker_count()
        self.peak_rss: list[int] = []
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._alive = self.workers
        command, env = python_module("adapterspec.fuse.worker_process")
        self._processes = [
            # A session of their own: an interrupt typed at the terminal reaches the fuse, which ends them.
            subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True)
            for _ in range(self.workers)
        ]
        self._threads = [threading.Thread(target=self._feed, args=(p,), daemon=True) for p in self._processes]
        for thread in self._threads:
            thread.start()

    def submit(self, task: MergeTask | MeasureTask) -> Future:
        future: Future = Future()
        with self._lock:
            if self._alive == 0:
                future.set_exception(WorkerFailed("no worker is left"))
                return future
            self._tasks.put((task, future))
        return future

    def _feed(self, process: subprocess.Popen) -> None:
        """On a thread per worker: hand it the next task and wait for its answer (the wait releases the GIL)."""
        while True:
            item = self._tasks.get()
            if item is not None and not item[1].set_running_or_notify_cancel():
                continue
            try:
                pickle.dump(item and item[0], process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                process.stdin.flush()
                ok, value = pickle.load(process.stdout)
            # ValueError: the pipe was closed under a read (the fuse stopped on an error while this worker ran)
            except (OSError, EOFError, ValueError, pickle.UnpicklingError) as error:
                if item is not None:
                    item[1].set_exception(WorkerFailed(f"{error!r}"))
                self._worker_ended()
                return
            if item is None:
                self.peak_rss.append(value)
                return
            item[1].set_result(value) if ok else item[1].set_exception(value)

    def _worker_ended(self) -> None:
        """A worker died: when it was the last one, fail the tasks nobody will take."""
        with self._lock:
            self._alive -= 1
            if self._alive:
                return
            while True:
                try:
                    item = self._tasks.get_nowait()
                except queue.Empty:
                    return
                if item is not None and item[1].set_running_or_notify_cancel():
                    item[1].set_exception(WorkerFailed("no worker is left"))

    def close(self, wait: bool = True) -> None:
        """Cancel the tasks not started and end the workers: after their running task (`wait`), or at once."""
        while True:
            try:
                item = self._tasks.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[1].cancel()
        for _ in self._threads:
            self._tasks.put(None)
        if wait:
            for thread in self._threads:
                thread.join(CLOSE_TIMEOUT)
        for process in self._processes:
            if process.poll() is None:
                process.kill()
            process.wait()
            for pipe in (process.stdin, process.stdout):
                with contextlib.suppress(OSError):  # unflushed bytes to a dead worker
                    pipe.close()

    def __enter__(self) -> "MergeWorkers":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(wait=exc_type is None)
