"""Leave without the caller waiting for the GPU's teardown: a forked child keeps the device files open past our exit.

When a process that used an NVIDIA GPU ends, the driver tears its context down as the process's last
file on the device closes, and the process's caller waits for it (most of the 0.13–0.19 s a fuse took
to end on an H100 host; `benchmarks/process_end.py` times it). Where this process holds such files (Linux, `/dev/nvidia*`) and its
work is done, `hand_over_device_files` forks a child that inherits them, closes everything else (so no
pipe a caller reads stays open), and waits for this process to be gone before it exits: this process
then ends at the speed of one that never opened the device, and the teardown runs in the child, after
the caller has its answer. Elsewhere (no such files, another system, ADAPTERSPEC_HAND_OVER=0) it does nothing.
"""

from __future__ import annotations

import os
import time
import warnings

DEVICE_FILE_PREFIX = "/dev/nvidia"
HAND_OVER_ENV = "ADAPTERSPEC_HAND_OVER"
# The child gives up waiting after this long (this process stuck in its own exit): the teardown is then its own.
WAIT_LIMIT_S = 60.0
POLL_S = 0.002


def open_files() -> dict[int, str]:
    """This process's open file descriptors and what each points to (none where /proc cannot tell)."""
    files = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return files
    for name in names:
        try:
            files[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except (OSError, ValueError):  # the listing's own descriptor, closed by now
            continue
    return files


def device_files() -> list[int]:
    """This process's open file descriptors on an NVIDIA device."""
    return [fd for fd, target in open_files().items() if target.startswith(DEVICE_FILE_PREFIX)]


def hand_over_device_files() -> bool:
    """Fork a child that holds this process's device files until this process has ended; whether one was forked.

    Call it once the work is done. What this process writes afterwards still reaches its caller; the child writes
    nothing (it leaves by os._exit, its copy of any buffered output dropped)."""
    if os.environ.get(HAND_OVER_ENV) == "0" or not hasattr(os, "fork"):
        return False
    kept = device_files()
    if not kept:
        return False
    parent = os.getpid()
    with warnings.catch_warnings():  # the fork of a threaded process: the child runs no thread's code, only syscalls
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            child = os.fork()
        except OSError:
            return False
    if child == 0:
        _hold_until_gone(parent, set(kept))
    return True


def _hold_until_gone(parent: int, kept: set[int]) -> None:
    """In the forked child: release everything but the device files, wait for `parent` to end, then exit."""
    try:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        for fd in open_files():
            if fd > 2 and fd not in kept:
                try:
                    os.close(fd)
                except OSError:
                    pass
        deadline = time.monotonic() + WAIT_LIMIT_S
        while os.getppid() == parent and time.monotonic() < deadline:
            time.sleep(POLL_S)
    finally:
        os._exit(0)
