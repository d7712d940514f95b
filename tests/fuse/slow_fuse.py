"""`python slow_fuse.py SECONDS ARGS...`: `adapterspec ARGS...` with a pause between the fuse's pieces of work, so that a
test can interrupt a fuse of a tiny model half-way (the pause lives here, not in the product)."""

import sys
import time

from adapterspec import cli
from adapterspec.fuse import stream


def _paused(step, seconds: float):
    def paused_step(self) -> None:
        step(self)
        time.sleep(seconds)

    return paused_step


if __name__ == "__main__":
    stream._Writing.step = _paused(stream._Writing.step, float(sys.argv[1]))
    sys.argv[1:] = sys.argv[2:]
    cli.entry()
