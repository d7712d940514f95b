"""`python slow_fuse.py SECONDS ARGS...`: `adapterspec ARGS...` with a pause between the fuse's pieces of work and
before each merge handed to a worker process, so that a test can interrupt a fuse of a tiny model half-way, its
workers still running (the pauses live here, not in the product)."""

import sys
import time

from adapterspec import cli
from adapterspec.fuse import stream, workers


def _paused(step, seconds: float):
    def paused_step(self, *args):
        result = step(self, *args)
        time.sleep(seconds)
        return result

    return paused_step


if __name__ == "__main__":
    stream._Writing.step = _paused(stream._Writing.step, float(sys.argv[1]))
    # The workers live as long as merges are being handed to them: on a loaded machine they could otherwise finish
    # a tiny model's merges and exit before the test sees them.
    workers.MergeWorkers.submit = _paused(workers.MergeWorkers.submit, float(sys.argv[1]))
    sys.argv[1:] = sys.argv[2:]
    cli.entry()
