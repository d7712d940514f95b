"""What moving bytes between the host and mlx's device costs, stage by stage, as a fuse moves them.

A fuse on a GPU hands each chunk's bytes to mlx (`mx.array(memoryview(...))`), merges them on the device and
takes the result's bytes back (`memoryview(array)`) to write them. Each stage is timed on its own, per GB, beside
a plain copy of host memory of the same size: making the input array, the device's first read of it, a device
operation on device memory, the result's buffer made visible to the host, and the host's first and second read of
it (into a preallocated bytearray, and into a file in the page cache).

    python benchmarks/host_transfer.py --mb 256 --rounds 5
"""

import argparse
import ctypes
import os
import statistics
import tempfile
import time

import mlx.core as mx


class MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


LOCATION_DEVICE, LOCATION_HOST = 1, 2


def driver():
    """The CUDA driver library with the calling thread bound to device 0's primary context, or None."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    context = ctypes.c_void_p()
    if cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), 0) or cuda.cuCtxSetCurrent(context):
        return None
    return cuda


def prefetch(cuda, view: memoryview, location: int) -> int:
    """Migrate a managed buffer's pages in one go (cuMemPrefetchAsync), then wait; the driver's status code."""
    address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    function = cuda.cuMemPrefetchAsync_v2
    function.argtypes = [ctypes.c_uint64, ctypes.c_size_t, MemLocation, ctypes.c_uint, ctypes.c_void_p]
    status = function(address, view.nbytes, MemLocation(location, 0), 0, None)
    return status or cuda.cuCtxSynchronize()


class Stages:
    """Times consecutive stages by name."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = now - self._last
        self._last = now


def one_round(nbytes: int, scratch: str, cuda) -> dict[str, float]:
    source = os.urandom(1 << 20) * (nbytes >> 20)
    landing = bytearray(nbytes)
    stages = Stages()
    landing[:] = source
    stages.mark("host copy (bytearray)")
    x = mx.array(memoryview(source)).view(mx.float16)
    stages.mark("input array (mx.array of bytes)")
    y = x + 1
    mx.eval(y)
    stages.mark("device's first read of the input (x + 1)")
    z = y * 2
    mx.eval(z)
    stages.mark("device op on device memory (y * 2)")
    view = memoryview(z).cast("B")
    stages.mark("result visible to the host (memoryview)")
    landing[:] = view
    stages.mark("host's first read of the result (bytearray)")
    landing[:] = view
    stages.mark("host's second read (bytearray)")
    w = y * 3
    mx.eval(w)
    stages.mark("another device op")
    with open(os.path.join(scratch, "out.bin"), "wb") as out:
        out.write(memoryview(w).cast("B"))
        stages.mark("another result to a file (memoryview, write)")
    with open(os.path.join(scratch, "plain.bin"), "wb") as out:
        out.write(source)
        stages.mark("host bytes to a file (write)")
    if cuda is not None:
        host_in = mx.array(memoryview(source))
        stages.mark("input array again")
        status = prefetch(cuda, memoryview(host_in), LOCATION_DEVICE)
        stages.mark(f"input prefetched to the device (status {status})")
        mx.eval(host_in.view(mx.float16) + 1)
        stages.mark("device's first read of the prefetched input")
        v = y * 4
        mx.eval(v)
        view = memoryview(v).cast("B")
        stages.mark("a device op, its result visible to the host")
        status = prefetch(cuda, view, LOCATION_HOST)
        stages.mark(f"result prefetched to the host (status {status})")
        landing[:] = view
        stages.mark("host's first read of the prefetched result")
    for name in ("out.bin", "plain.bin"):
        os.unlink(os.path.join(scratch, name))
    return stages.seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    nbytes = args.mb << 20
    print(f"mlx {mx.__version__}, {mx.default_device()}, {args.mb} MB per stage, median of {args.rounds} rounds")
    rounds = []
    cuda = driver() if mx.default_device() == mx.gpu else None
    with tempfile.TemporaryDirectory() as scratch:
        one_round(nbytes, scratch, cuda)
        for _ in range(args.rounds):
            rounds.append(one_round(nbytes, scratch, cuda))
    for stage in rounds[0]:
        seconds = statistics.median(r[stage] for r in rounds)
        print(f"{stage:52s} {seconds * 1e3:8.1f} ms  {nbytes / seconds / 1e9:6.2f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
