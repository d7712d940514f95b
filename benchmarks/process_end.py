"""How long a process that used mlx's device takes to end, as its parent waits for it: kept open, handed over, os._exit.

Each round starts a child that imports mlx, moves --gb gigabytes through the device in chunks (as a fuse does:
host bytes in, an elementwise merge, bytes back), prints the moment its work is done, and ends in one of three ways:
normally, keeping its GPU device files to the end; normally after `adapterspec.process_end.hand_over_device_files`
(what `adapterspec` does); by os._exit with the files kept. The parent reports the median time from the child's
"done" to its wait returning, per way, over --rounds rounds that run every way once. On a machine without an NVIDIA
GPU there is nothing to hand over and the three differ by the interpreter's teardown alone.

    python benchmarks/process_end.py --gb 1 --rounds 5
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WAYS = {
    "kept to the end": {"ADAPTERSPEC_HAND_OVER": "0"},
    "handed over (adapterspec)": {},
    "kept, os._exit": {"ADAPTERSPEC_HAND_OVER": "0", "END_BY_EXIT": "1"},
}
CHUNK_MB = 96


def child(gb: float) -> None:
    import mlx.core as mx

    sys.path.insert(0, str(ROOT))
    from adapterspec.process_end import device_files, hand_over_device_files

    chunk = bytes(CHUNK_MB << 20)
    for _ in range(max(1, int(gb * 1024 / CHUNK_MB))):
        x = mx.array(memoryview(chunk)).view(mx.float16)
        y = x * 1.5 + 1
        mx.eval(y)
        bytes(memoryview(y))
    print(f"device files {len(device_files())}", flush=True)
    print(f"done {time.time():.6f}", flush=True)
    if os.environ.get("END_BY_EXIT"):
        os._exit(0)
    hand_over_device_files()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.gb)
        return 0
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    files = None
    for _ in range(args.rounds):
        for way, env in WAYS.items():
            process = subprocess.Popen([sys.executable, __file__, "--child", "--gb", str(args.gb)],
                                       stdout=subprocess.PIPE, text=True, env={**os.environ, **env})  # fmt: skip
            done = None
            for line in process.stdout:
                if line.startswith("done "):
                    done = float(line.split()[1])
                elif line.startswith("device files "):
                    files = int(line.split()[2])
            process.wait()
            ended = time.time()
            if done is None or process.returncode:
                print(f"{way}: the child failed ({process.returncode})", file=sys.stderr)
                return 1
            seconds[way].append(ended - done)
    import mlx.core as mx

    print(f"mlx {mx.__version__}, device {mx.default_device()}, {files} device files open at the end, "
          f"{args.gb:g} GB through the device, {args.rounds} rounds")  # fmt: skip
    print("| how the process ends | from 'done' to the parent's wait returning: median (min – max) |")
    print("| --- | --- |")
    for way, values in seconds.items():
        print(
            f"| {way} | {statistics.median(values) * 1000:.0f} ms ({min(values) * 1000:.0f} – {max(values) * 1000:.0f}) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
