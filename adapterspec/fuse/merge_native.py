"""merge_numpy's inner loops in C (`merge_native.c`), compiled once per machine with the system's C compiler.

MLX compiles its own CPU kernels the same way. Without a compiler, or with ADAPTERSPEC_FUSE_NATIVE=0,
`kernels()` is None and numpy computes the same bits more slowly. The library is cached under
~/.cache/adapterspec, keyed by the source, the flags, the compiler and the CPU (it is built for the
CPU it runs on).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from ..cache import cache_dir

SOURCE = Path(__file__).with_name("merge_native.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared")
NATIVE_ENV = "ADAPTERSPEC_FUSE_NATIVE"
# The dtypes the kernels compute in; bfloat16 arrays travel as their uint16 bit patterns (numpy has no bfloat16).
DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}
COMPILE_TIMEOUT = 120


def enabled() -> bool:
    return os.environ.get(NATIVE_ENV, "1").strip() != "0"


def disable() -> None:
    """Use numpy from now on, in this process and in worker processes started after."""
    os.environ[NATIVE_ENV] = "0"


def kernels() -> Optional[ctypes.CDLL]:
    """The compiled library, or None (disabled, no compiler, or it failed to build or load)."""
    return _load() if enabled() else None


@functools.lru_cache(maxsize=None)
def _load() -> Optional[ctypes.CDLL]:
    try:
        path = _built()
        if path is None:
            return None
        library = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError):
        return None
    pointer, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    library.merge_dense.argtypes = (pointer, pointer, i32, pointer, pointer, i32, i32, i32, f32)
    library.merge_affine.argtypes = (pointer, pointer, pointer, i32, pointer, pointer, i32, i32, i32, f32, i32, i32, i32,
                                     i32, pointer, pointer, pointer, pointer)  # fmt: skip
    for function in (library.merge_dense, library.merge_affine):
        function.restype = i32
    return library


def _built() -> Optional[Path]:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    cache = cache_dir()
    if compiler is None or cache is None:
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=COMPILE_TIMEOUT).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), *FLAGS, compiler, version, platform.machine(), _cpu()]).encode()
    )
    path = cache / f"fuse-native-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        built = Path(scratch) / path.name
        for flags in (FLAGS, tuple(f for f in FLAGS if f != "-march=native")):  # some compilers know no -march=native
            result = subprocess.run(
                [compiler, *flags, str(SOURCE), "-o", str(built), "-lm"], capture_output=True, timeout=COMPILE_TIMEOUT
            )
            if result.returncode == 0:
                os.replace(built, path)  # atomic: processes building at once each get a whole library
                return path
    return None


def _cpu() -> str:
    """What -march=native depends on: the CPU's model and flags, where the system tells."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags", "Features"))}))


def _ptr(array: np.ndarray) -> int:
    return array.ctypes.data


def merge_dense(
    library: ctypes.CDLL, weight: np.ndarray, dtype: str, a_t: np.ndarray, b_t: np.ndarray, scale: float
) -> np.ndarray:
    """W + scale·(A·B)ᵀ rounded once to `dtype`, for W (rows, cols); a_t (r, cols), b_t (rows, r), float32, C order."""
    weight = np.ascontiguousarray(weight)
    out = np.empty_like(weight)
    rows, cols = weight.shape
    _check(
        library.merge_dense(
            _ptr(weight), _ptr(out), DTYPES[dtype], _ptr(a_t), _ptr(b_t), rows, cols, a_t.shape[0], scale
        )
    )
    return out


def merge_affine(
    library: ctypes.CDLL,
    packed,
    scales,
    biases,
    dtype: str,
    a_t,
    b_t,
    scale: float,
    bits: int,
    group_size: int,
    requantize: bool,
    grid: bool = False,
) -> Optional[tuple[np.ndarray, ...]]:
    """`merge_numpy.QuantizedMerge.rows` in C, scales of `dtype`, a_t in the weight's own column order; None where a
    merged value is not finite (the caller leaves those to mlx)."""
    packed, scales, biases = (np.ascontiguousarray(x) for x in (packed, scales, biases))
    rows, groups = scales.shape
    cols = groups * group_size
    if requantize:
        outputs = (np.empty_like(packed), np.empty_like(scales), np.empty_like(biases))
        pointers = (_ptr(outputs[0]), _ptr(outputs[1]), _ptr(outputs[2]), None)
    else:
        outputs = (np.empty((rows, cols), scales.dtype),)
        pointers = (None, None, None, _ptr(outputs[0]))
    status = library.merge_affine(
        _ptr(packed), _ptr(scales), _ptr(biases), DTYPES[dtype], _ptr(a_t), _ptr(b_t),
        rows, cols, a_t.shape[0], scale, bits, group_size, int(requantize), int(grid), *pointers,
    )  # fmt: skip
    if status == 1:
        return None
    _check(status)
    return outputs


def _check(status: int) -> None:
    if status == 2:
        raise MemoryError("the native fuse kernel could not allocate a row")
    if status != 0:
        raise RuntimeError(f"the native fuse kernel failed ({status})")
