"""Where one `adapterspec fuse` spends its time: the fuse run in this process, its stages timed on a timeline.

Stages: the process start (interpreter up to this script's first line), importing mlx and the command, starting
the device (the first evaluation), and within the fuse the plan, the spec planned again to check the saved plan
(in a process of its own where the adapter directory saved one: its start and the wait for its answer), the
adapters' loading, every chunk read, merged
on the device, evaluated and written, every untouched tensor copied, the erasure measure, and the rest
(publishing the directory). For each stage: how many times it ran, its busy seconds summed over its calls,
and when its first call began and its last ended, from the process start.

    python benchmarks/fuse_trace.py MODEL ADAPTERS OUT [fuse options]    # e.g. --device gpu
    python benchmarks/fuse.py --trace ...                                 # on the model fuse.py writes

It leaves as `adapterspec` does, handing its GPU device files to a forked child (`adapterspec.process_end`);
with ADAPTERSPEC_HAND_OVER=0 it keeps them to its end, with FUSE_TRACE_HARD_EXIT=1 as well it leaves by os._exit,
skipping the interpreter's and the libraries' teardown (`fuse.py --trace` times all three, as the parent waits).
"""

import time

STARTED = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EVENTS: list[tuple[str, str, float, float]] = []
_LOCK = threading.Lock()


def process_age_s() -> float:
    """Seconds since the kernel started this process (0 where /proc cannot tell)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return uptime - ticks / os.sysconf("SC_CLK_TCK")


def record(stage: str, start: float, end: float) -> None:
    with _LOCK:
        EVENTS.append((stage, threading.current_thread().name, start, end))


def timed(owner, name: str, stage: str) -> None:
    """Replace `owner.name` by a wrapper that records each call as `stage`."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            record(stage, start, time.perf_counter())

    setattr(owner, name, wrapper)


def main(argv: list[str]) -> int:
    before_script = process_age_s() - (time.perf_counter() - STARTED)
    t = time.perf_counter()
    import mlx.core as mx

    record("import mlx.core", t, time.perf_counter())
    t = time.perf_counter()
    mx.eval(mx.ones(4) + 1)
    record(f"device start ({mx.default_device()})", t, time.perf_counter())
    t = time.perf_counter()
    from adapterspec import cli
    from adapterspec.commands import fuse as fuse_command  # noqa: F401  (what `adapterspec fuse` imports)
    from adapterspec.fuse import adapter_source, erasure, pipeline, run, stream

    record("import adapterspec (fuse command)", t, time.perf_counter())
    timed(run, "plan_fuse", "plan")
    timed(adapter_source, "plan_of", "spec planned here (plan_of)")
    timed(adapter_source.SpecCheck, "__init__", "spec check: process started")
    timed(adapter_source.SpecCheck, "entries", "spec check: waited for")
    timed(run, "_load_adapter_arrays", "load adapters")
    timed(stream, "write_shards", "write_shards (whole)")
    timed(stream, "_copy", "copy untouched tensor")
    timed(pipeline, "read_raw", "read chunk (into mlx arrays)")
    timed(pipeline, "submit", "submit chunk (build graph)")
    timed(pipeline, "evaluated", "wait for chunk (device)")
    timed(pipeline.Pipeline, "_write_and_release", "write chunk")
    timed(erasure, "_measure_lora_in_numpy", "erasure measure (numpy batch)")
    timed(erasure, "_measure_unit", "erasure measure (mlx unit)")
    t = time.perf_counter()
    code = cli.main(["fuse", *argv, "--quiet", "--force"])
    record("adapterspec fuse (whole)", t, time.perf_counter())
    stages: dict[str, dict] = defaultdict(lambda: {"calls": 0, "busy_s": 0.0, "first_s": None, "last_s": 0.0})
    for stage, _thread, start, end in EVENTS:
        s = stages[stage]
        s["calls"] += 1
        s["busy_s"] += end - start
        s["first_s"] = start - STARTED if s["first_s"] is None else min(s["first_s"], start - STARTED)
        s["last_s"] = max(s["last_s"], end - STARTED)
    offset = max(before_script, 0.0)
    print(f"{'stage':<38} {'calls':>5} {'busy s':>8} {'from s':>8} {'to s':>8}")
    print(f"{'process start to script':<38} {1:>5} {offset:>8.3f} {0:>8.3f} {offset:>8.3f}")
    for stage, s in stages.items():
        print(f"{stage:<38} {s['calls']:>5} {s['busy_s']:>8.3f} {s['first_s'] + offset:>8.3f} "
              f"{s['last_s'] + offset:>8.3f}")  # fmt: skip
    total = time.perf_counter() - STARTED + offset
    print(f"{'total (process start to exit)':<38} {'':>5} {total:>8.3f}")
    summary = {"exit_code": code, "process_start_s": offset, "total_s": total, "stages": dict(stages)}
    print(json.dumps(summary), file=sys.stderr)
    if os.environ.get("FUSE_TRACE_HARD_EXIT"):  # what the interpreter's and the libraries' teardown cost
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    from adapterspec.process_end import hand_over_device_files

    hand_over_device_files()  # as `adapterspec` does (ADAPTERSPEC_HAND_OVER=0: not)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
