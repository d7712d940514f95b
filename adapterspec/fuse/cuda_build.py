"""The GPU code (a cubin) of a CUDA C source, built once per machine with the runtime compiler (NVRTC) that mlx's
CUDA build loads, and cached under ~/.cache/adapterspec.

mlx's own `mx.fast.cuda_kernel` compiles its source again in every process (its disk cache keeps mlx's kernels
only): on an H100 host the fuses that used it took 2–3 s longer than without, more than a whole 4-bit fuse
spends merging. `mx.fast.precompiled_cuda_kernel` takes built code instead; building one of the fuse's kernels
takes 0.08 s, reading it from the cache 1 ms. The code is keyed by the source, the options, NVRTC's version and
the GPU's compute capability. No package: NVRTC and the driver are called through `ctypes`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Optional

from ..cache import cache_dir

NVRTC_NAMES = ("libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so")
ATTRIBUTE_MAJOR, ATTRIBUTE_MINOR = 75, 76


class BuildError(RuntimeError):
    """NVRTC is missing or rejected the source (its log is the message)."""


def cubin(source: str) -> bytes:
    """The GPU code of `source`, built for this GPU (a cubin: the driver loads it without compiling anything): from
    the cache, else built and cached."""
    nvrtc = _nvrtc()
    if nvrtc is None:
        raise BuildError("no NVRTC library is loaded or found")
    major, minor = ctypes.c_int(), ctypes.c_int()
    nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    options = [f"--gpu-architecture=sm_{compute_capability()}", "--fmad=false", "-std=c++17"]
    key = hashlib.sha256("\0".join([source, *options, f"nvrtc {major.value}.{minor.value}"]).encode()).hexdigest()
    cache = cache_dir()
    path = None if cache is None else cache / "cuda" / f"{key[:24]}.cubin"
    if path is not None and path.is_file():
        return path.read_bytes()
    code = _compile(nvrtc, source, options)
    if path is not None:
        _store(path, code)
    return code


def _store(path: Path, code: bytes) -> None:
    """Write atomically (processes building at once each see a whole file); a cache that cannot be written is
    skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as scratch:
            scratch.write(code)
        os.replace(scratch.name, path)
    except OSError:
        pass


def _compile(nvrtc: ctypes.CDLL, source: str, options: list[str]) -> bytes:
    program = ctypes.c_void_p()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"adapterspec.cu", 0, None, None):
        raise BuildError("NVRTC could not create a program")
    try:
        encoded = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        if nvrtc.nvrtcCompileProgram(program, len(options), encoded):
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(program, log)
            raise BuildError(log.value.decode(errors="replace"))
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size))
        code = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetCUBIN(program, code)
        return code.raw
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


@functools.lru_cache(maxsize=1)
def driver() -> Optional[ctypes.CDLL]:
    """The CUDA driver's library, initialised; None where there is none."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    return None if cuda.cuInit(0) else cuda


@functools.lru_cache(maxsize=1)
def compute_capability() -> str:
    """The compute capability of CUDA device 0 as NVRTC spells it ("90" for 9.0), from the driver."""
    cuda = driver()
    device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if (
        cuda is None
        or cuda.cuDeviceGet(ctypes.byref(device), 0)
        or cuda.cuDeviceGetAttribute(ctypes.byref(major), ATTRIBUTE_MAJOR, device)
        or cuda.cuDeviceGetAttribute(ctypes.byref(minor), ATTRIBUTE_MINOR, device)
    ):
        raise BuildError("the CUDA driver did not give the device's compute capability")
    return f"{major.value}{minor.value}"


@functools.lru_cache(maxsize=1)
def _nvrtc() -> Optional[ctypes.CDLL]:
    """NVRTC: the copy this process loaded already (mlx links it), else one the loader finds by name."""
    try:
        with open("/proc/self/maps") as maps:
            loaded = [line.split()[-1] for line in maps if "libnvrtc.so" in line and "builtins" not in line]
    except OSError:
        loaded = []
    for name in loaded[:1] + list(NVRTC_NAMES):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None
