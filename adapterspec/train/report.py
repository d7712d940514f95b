"""Progress lines of a training run (loss, tokens/s, ETA) as an mlx-lm TrainingCallback, printed on rank 0."""

from __future__ import annotations

import math
import sys
from typing import Optional, TextIO


def format_duration(seconds: Optional[float]) -> str:
    """`1:02:03`, `2:03` or `0:07`; `?` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_count(n: float) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= limit:
            return f"{n / limit:.1f}{suffix}"
    return f"{n:.0f}"


class ProgressReport:
    """Prints one line per report: step, train loss, learning rate, tokens/s, tokens so far, memory, ETA.

    It has mlx-lm's TrainingCallback methods (on_train_loss_report, on_val_loss_report) and passes every
    report on to `then`, another TrainingCallback (e.g. mlx-lm's wandb reporter), when given.
    """

    def __init__(self, iters: int, rank: int = 0, stream: Optional[TextIO] = None, then=None):
        self.iters = iters
        self.width = len(str(iters))
        self.rank = rank
        self.stream = stream
        self.then = then
        self.history: list[dict] = []
        self.val_history: list[dict] = []

    def print(self, text: str) -> None:
        if self.rank == 0:
            print(text, file=self.stream or sys.stdout, flush=True)

    def step(self, it: int) -> str:
        return f"iter {it:>{self.width}}/{self.iters}"

    def on_train_loss_report(self, info: dict) -> None:
        self.history.append(info)
        self.print(
            f"{self.step(info['iteration'])}  loss {info['train_loss']:.3f}  lr {info['learning_rate']:.2e}  "
            f"{info['tokens_per_second']:,.0f} tok/s  {format_count(info['trained_tokens'])} tok  "
            f"{info['peak_memory']:.2f} GB  ETA {format_duration(info.get('eta_seconds'))}"
        )
        if self.then is not None:
            self.then.on_train_loss_report(info)

    def on_val_loss_report(self, info: dict) -> None:
        self.val_history.append(info)
        self.print(f"{self.step(info['iteration'])}  val loss {info['val_loss']:.3f}  ({info['val_time']:.1f}s)")
        if self.then is not None:
            self.then.on_val_loss_report(info)

    def on_save(self, it: int, path) -> None:
        self.print(f"{self.step(it)}  saved {path}")

    def on_test(self, loss: float) -> None:
        self.print(f"Test loss {loss:.3f}, Test ppl {math.exp(min(loss, 700)):.3f}.")
