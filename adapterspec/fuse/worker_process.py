"""A fuse's worker process (`workers` starts them): merge tasks and measure tasks from stdin, answers to stdout.

Run as `python -m adapterspec.fuse.worker_process`; imports numpy and the numpy side of the fuse, never mlx.
"""

from __future__ import annotations

import functools
import os
import pickle
import resource
import signal
import sys

import numpy as np

from .measure_numpy import measure_lora
from .merge_numpy import DenseMerge, QuantizedMerge
from .shards import SourceFiles, SourceTensor, pread_all, pwrite_all
from .workers import MeasureTask, MergeTask

ADAPTER_CACHE = 16
_FILES = SourceFiles()  # the inputs a measure task reads, open until the process ends


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
                answer = (True, measure_task(task) if isinstance(task, MeasureTask) else merge_task(task))
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


def measure_task(task: MeasureTask) -> dict:
    """In a worker: the Measurements of the task's units, by path. Raises merge_numpy.Unrepresentable."""
    names = {unit.adapter_tensors[p] for unit in task.units for p in ("lora_a", "lora_b")}
    lora = {source.name: _read_tensor(source).astype(np.float32) for source in names}
    return measure_lora(list(task.units), lora, _FILES, task.limit)


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
