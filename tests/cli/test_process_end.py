"""The GPU device files are handed to a forked child at the end: the caller's pipes close, the files outlive the process."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {root!r})
    from adapterspec import process_end
    process_end.DEVICE_FILE_PREFIX = {fifo!r}   # the stand-in for /dev/nvidia*: a FIFO the test reads
    held = os.open({fifo!r}, os.O_WRONLY)
    print("before", process_end.device_files() == [held], flush=True)
    print("handed over", process_end.hand_over_device_files(), flush=True)
    holders = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{{pid}}/fd/{{fd}}") == {fifo!r} for fd in os.listdir(f"/proc/{{pid}}/fd")):
                holders.add(int(pid))
        except OSError:
            continue
    print("held by another of its processes", bool(holders - {{os.getpid(), os.getppid()}}), flush=True)
    os.write(held, b"written before the end")
    """
)

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd") or not hasattr(os, "fork"), reason="Linux only")


def run_holding_fifo(tmp_path: Path, env: dict) -> tuple[subprocess.CompletedProcess, bytes]:
    fifo = tmp_path / "device"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        script = SCRIPT.format(root=str(ROOT), fifo=str(fifo))
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                              env={**os.environ, **env})  # fmt: skip
        os.set_blocking(reader, True)
        received = b""
        while chunk := os.read(reader, 4096):  # ends when the last holder of the write end has closed it
            received += chunk
        return done, received
    finally:
        os.close(reader)


def test_the_device_files_are_handed_to_a_child_that_closes_everything_else(tmp_path):
    done, received = run_holding_fifo(tmp_path, {})
    assert done.returncode == 0, done.stderr
    # The caller's captured output came to its end although a child lived on: the child closed its copies.
    assert done.stdout.splitlines() == ["before True", "handed over True", "held by another of its processes True"]
    assert done.stderr == ""
    assert received == b"written before the end"


def test_nothing_is_handed_over_when_turned_off(tmp_path):
    done, received = run_holding_fifo(tmp_path, {"ADAPTERSPEC_HAND_OVER": "0"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["before True", "handed over False", "held by another of its processes False"]
    assert received == b"written before the end"


def test_a_process_without_device_files_forks_nothing():  # it never imported mlx: no device opened
    script = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from adapterspec import process_end; " \
             "print(process_end.hand_over_device_files())"  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False"
