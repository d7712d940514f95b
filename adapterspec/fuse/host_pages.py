"""A GPU result's pages moved to the host in one migration before a writing thread reads them (CUDA only).

mlx hands the host a GPU array's bytes as CUDA managed memory, whose pages the host's first read faults over
one by one: on an H100 host, writing 256 MB of a result to a file took 195 ms from there against 76 ms from host
memory. `cuMemPrefetchAsync` moves them in bulk (26 ms), on a stream of the writing thread's own, through the
CUDA driver's library (`ctypes`: no package). On by default where mlx computes on a CUDA GPU;
ADAPTERSPEC_FUSE_PREFETCH=0 turns it off. Any failure leaves the pages where they are.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from typing import Optional

from .cuda_build import driver

LOCATION_DEVICE, LOCATION_HOST = 1, 2
STREAM_NON_BLOCKING = 1


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class Prefetcher:
    """Prefetches managed buffers to the host from any thread (each binds the device's primary context once)."""

    def __init__(self, cuda: ctypes.CDLL, context: ctypes.c_void_p):
        self._cuda = cuda
        self._context = context
        self._bound = threading.local()
        self._prefetch = cuda.cuMemPrefetchAsync_v2
        self._prefetch.argtypes = [ctypes.c_uint64, ctypes.c_size_t, _Location, ctypes.c_uint, ctypes.c_void_p]

    def to_host(self, view: memoryview) -> bool:
        return self.to(view, LOCATION_HOST)

    def to(self, view: memoryview, location: int) -> bool:
        """Move a managed buffer's pages to `location` (LOCATION_HOST, LOCATION_DEVICE: device 0) and wait; whether
        the driver did (buffers under 1 MB are left alone)."""
        if view.nbytes < (1 << 20) or view.readonly:
            return False
        stream = getattr(self._bound, "stream", None)
        if stream is None:
            # A stream of this thread's own that waits for no other (the legacy default stream would wait for
            # mlx's work in flight).
            self._cuda.cuCtxSetCurrent(self._context)
            stream = ctypes.c_void_p()
            if self._cuda.cuStreamCreate(ctypes.byref(stream), STREAM_NON_BLOCKING):
                return False
            self._bound.stream = stream
        address = ctypes.addressof(ctypes.c_char.from_buffer(view))
        if self._prefetch(address, view.nbytes, _Location(location, 0), 0, stream):
            return False
        return self._cuda.cuStreamSynchronize(stream) == 0


@functools.lru_cache(maxsize=1)
def prefetcher() -> Optional[Prefetcher]:
    """The prefetcher where mlx computes on a CUDA GPU (unless ADAPTERSPEC_FUSE_PREFETCH=0); else None."""
    import mlx.core as mx

    if os.environ.get("ADAPTERSPEC_FUSE_PREFETCH", "1") == "0" or mx.default_device().type != mx.DeviceType.gpu:
        return None
    if not mx.cuda.is_available():
        return None
    return driver_prefetcher()


def driver_prefetcher() -> Optional[Prefetcher]:
    """A prefetcher on CUDA device 0's primary context, wherever the driver has one (no other condition)."""
    cuda = driver()
    context = ctypes.c_void_p()
    if cuda is None or cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), 0):
        return None
    try:
        return Prefetcher(cuda, context)
    except AttributeError:  # a driver without cuMemPrefetchAsync_v2
        return None
