"""Progress of a fuse on stderr: shards, bytes and time left on a terminal; silent anywhere else."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    """Silent progress: the interface the fuse drives."""

    def start(self, total_bytes: int, shards: int) -> None:
        pass

    def shard(self, number: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def close(self) -> None:
        pass


class RichProgress(Progress):
    def __init__(self, stream: TextIO):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as Bar

        self._bar = Bar(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
            console=Console(file=stream), transient=True,
        )  # fmt: skip
        self._task = None
        self._shards = 0

    def start(self, total_bytes: int, shards: int) -> None:
        self._shards = shards
        self._bar.start()
        self._task = self._bar.add_task(f"fusing shard 1/{shards}", total=total_bytes)

    def shard(self, number: int) -> None:
        self._bar.update(self._task, description=f"fusing shard {number}/{self._shards}")

    def advance(self, nbytes: int) -> None:
        self._bar.advance(self._task, nbytes)

    def close(self) -> None:
        self._bar.stop()


class TextProgress(Progress):
    """One rewritten line, for terminals without rich."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._total = self._done = 0
        self._shards = self._shard = 0
        self._started = self._shown = 0.0

    def start(self, total_bytes: int, shards: int) -> None:
        self._total, self._shards, self._started = total_bytes, shards, time.monotonic()

    def shard(self, number: int) -> None:
        self._shard = number

    def advance(self, nbytes: int) -> None:
        self._done += nbytes
        now = time.monotonic()
        if now - self._shown > 0.2 or self._done >= self._total:
            self._shown = now
            elapsed = now - self._started
            left = elapsed * (self._total - self._done) / self._done if self._done else 0.0
            filled = int(30 * self._done / max(self._total, 1))
            self._stream.write(
                f"\rshard {self._shard}/{self._shards} [{'#' * filled}{'.' * (30 - filled)}] "
                f"{self._done / 1e9:.2f}/{self._total / 1e9:.2f} GB, {left:.0f} s left "
            )
            self._stream.flush()

    def close(self) -> None:
        self._stream.write("\r" + " " * 79 + "\r")
        self._stream.flush()


def progress_for(stream: Optional[TextIO] = None, enabled: Optional[bool] = None) -> Progress:
    """A progress display on `stream` (stderr) when it is a terminal, or when `enabled` says so."""
    stream = stream or sys.stderr
    if enabled is None:
        enabled = stream.isatty()
    if not enabled:
        return Progress()
    try:
        return RichProgress(stream)
    except ImportError:
        return TextProgress(stream)
