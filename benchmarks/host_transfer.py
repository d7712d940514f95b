"""What moving bytes between the host and mlx's device costs, stage by stage, as a fuse moves them.

A fuse on a GPU hands each chunk's bytes to mlx (`mx.array(memoryview(...))`), merges them on the device and
takes the result's bytes back (`memoryview(array)`) to write them. Each stage is timed on its own, per GB, beside
a plain copy of host memory of the same size: making the input array, the device's first read of it, a device
operation on device memory, the result's buffer made visible to the host, and the host's first and second read of
it (into a preallocated bytearray, and into a file in the page cache).

    python benchmarks/host_transfer.py --mb 256 --rounds 5
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapterspec.fuse.host_pages import LOCATION_DEVICE, LOCATION_HOST, driver_prefetcher  # noqa: E402


class Stages:
    """Times consecutive stages by name."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = now - self._last
        self._last = now


def one_round(nbytes: int, scratch: str, pages) -> dict[str, float]:
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
    if pages is not None:
        host_in = mx.array(memoryview(source))
        stages.mark("input array again")
        moved = pages.to(memoryview(host_in), LOCATION_DEVICE)
        stages.mark(f"input prefetched to the device ({'done' if moved else 'failed'})")
        mx.eval(host_in.view(mx.float16) + 1)
        stages.mark("device's first read of the prefetched input")
        v = y * 4
        mx.eval(v)
        view = memoryview(v).cast("B")
        stages.mark("a device op, its result visible to the host")
        moved = pages.to(view, LOCATION_HOST)
        stages.mark(f"result prefetched to the host ({'done' if moved else 'failed'})")
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
    pages = driver_prefetcher() if mx.default_device() == mx.gpu else None
    with tempfile.TemporaryDirectory() as scratch:
        one_round(nbytes, scratch, pages)
        for _ in range(args.rounds):
            rounds.append(one_round(nbytes, scratch, pages))
    for stage in rounds[0]:
        seconds = statistics.median(r[stage] for r in rounds)
        print(f"{stage:52s} {seconds * 1e3:8.1f} ms  {nbytes / seconds / 1e9:6.2f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
