"""Worker processes that merge LoRA into weights (`merge_numpy`: compiled kernels or numpy), reading and writing the files themselves.

Processes, not threads: the merge is a few dozen short numpy calls per tile, and between them a
thread needs the GIL back; two threads of it ran 1.15× one thread's speed on two cores, two
processes 2×. Each worker is `python -m adapterspec.fuse.workers`, fed pickled tasks on its stdin and
answering on its stdout, so nothing of the caller's program is imported again (multiprocessing's
spawn would re-run an unguarded script). A task names byte ranges: of the input files (a chunk of
rows, the adapter tensors) and of the output shards, laid out beforehand, where the worker writes
the merged rows; only a count of bytes comes back. Workers import numpy, `merge_numpy` and
`merge_native`, never mlx; they ignore SIGINT, and exit when their stdin closes (the parent ended, or
was killed).
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import queue
import resource
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import EXIT_ERRORS, UserError
from ..processes import python_module
from .merge_numpy import DenseMerge, QuantizedMerge
from .shards import SourceTensor, pread_all, pwrite_all

MAX_WORKERS = 8
# Each worker holds a chunk and an interpreter (~40 MB): more than this only costs memory.
MAX_WORKERS_GIVEN = 64
WORKERS_ENV = "ADAPTERSPEC_FUSE_WORKERS"
ADAPTER_CACHE = 16
CLOSE_TIMEOUT = 10.0


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
        command, env = python_module("adapterspec.fuse.workers")
        self._processes = [
            # A session of their own: an interrupt typed at the terminal reaches the fuse, which ends them.
            subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True)
            for _ in range(self.workers)
        ]
        self._threads = [threading.Thread(target=self._feed, args=(p,), daemon=True) for p in self._processes]
        for thread in self._threads:
            thread.start()

    def submit(self, task: MergeTask) -> Future:
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


def serve() -> None:
    """A worker's loop: a task from stdin, its result (or the exception it raised) to stdout.

    None asks it to stop: it answers with its peak resident memory, in bytes. A closed stdin stops it too.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tasks, answers = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            task = pickle.load(tasks)
        except (EOFError, OSError):  # the parent closed the pipe or died
            return
        if task is None:
            answer = (True, peak_rss())
        else:
            try:
                answer = (True, merge_task(task))
            except Exception as error:  # handed to the parent, which decides
                answer = (False, error)
        try:
            pickle.dump(answer, answers, protocol=pickle.HIGHEST_PROTOCOL)
            answers.flush()
        except OSError:  # the parent went away while this task ran: nobody waits for the answer
            return
        if task is None:
            return


def peak_rss() -> int:
    """This process's peak resident memory in bytes.

    Linux's VmHWM, where there is one: ru_maxrss also counts the parent's memory the process was forked with.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def merge_task(task: MergeTask) -> dict:
    """In a worker: read the task's inputs, merge them, and write the outputs to their targets.

    Returns the output arrays by name, or with targets the bytes written by name. Raises merge_numpy.Unrepresentable.
    """
    start, stop = task.rows
    sources = dict(task.base)
    base = {param: _read_rows(source, start, stop) for param, source in sources.items()}
    lora_b = _read_tensor(task.lora_b)[:, start:stop]
    if task.quantization is None:
        parts = (_dense(task.lora_a, task.scale).rows(base["weight"], lora_b, sources["weight"].dtype),)
    else:
        merge = _quantized(task.lora_a, task.scale, *task.quantization)
        parts = merge.rows(
            base["weight"], base["scales"], base["biases"], lora_b, task.requantize, sources["scales"].dtype, task.grid
        )
    if not task.targets:
        return dict(zip(task.names, parts))
    for (path, offset), part in zip(task.targets, parts):
        pwrite_all(_output_fd(path), part, offset)
    return {name: part.nbytes for name, part in zip(task.names, parts)}


@functools.lru_cache(maxsize=ADAPTER_CACHE)
def _quantized(lora_a: SourceTensor, scale: float, bits: int, group_size: int) -> QuantizedMerge:
    return QuantizedMerge(_read_tensor(lora_a), scale, bits, group_size)


@functools.lru_cache(maxsize=ADAPTER_CACHE)
def _dense(lora_a: SourceTensor, scale: float) -> DenseMerge:
    return DenseMerge(_read_tensor(lora_a), scale)


def _read_rows(source: SourceTensor, start: int, stop: int) -> np.ndarray:
    """Rows start:stop of a tensor as stored (bfloat16 as its uint16 bit patterns)."""
    raw = b"".join(pread_all(_fd(str(path)), n, offset) for path, offset, n in source.slab_ranges(start, stop))
    dtype = np.uint16 if source.dtype == "bfloat16" else source.dtype
    return np.frombuffer(raw, dtype).reshape((stop - start,) + tuple(source.shape[1:]))


@functools.lru_cache(maxsize=ADAPTER_CACHE)
def _read_tensor(source: SourceTensor) -> np.ndarray:
    """A whole (small) adapter tensor, float32 unless it is float16; cached, as every chunk of a unit needs it."""
    raw = pread_all(_fd(str(source.path)), source.nbytes, source.offset)
    return _as_numpy(raw, source.dtype).reshape(source.shape)


def _as_numpy(raw: bytes, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # numpy has no bfloat16; its float32 value is its bits shifted up
        return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, dtype)


@functools.lru_cache(maxsize=None)
def _fd(path: str) -> int:
    return os.open(path, os.O_RDONLY)


@functools.lru_cache(maxsize=None)
def _output_fd(path: str) -> int:
    return os.open(path, os.O_WRONLY)


if __name__ == "__main__":
    serve()
    os._exit(0)  # nothing buffered is left to flush into a pipe whose reader may be gone
