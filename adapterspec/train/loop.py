"""The training loop on mlx-lm's trainer pieces (loss, evaluation, gradient checkpointing): it can start at any
checkpointed step, averages gradients over `mx.distributed` processes, and builds the optimizer and schedule."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

from ..errors import UserError
from .options import TrainOptions
from .state import StartState


@dataclass
class TrainResult:
    """What a run did: the last step, losses by step, test loss, throughput, the output directory."""

    out: Optional[Path] = None
    model: object = None
    plan: object = None
    step: int = 0
    resumed_from: Optional[int] = None
    train_losses: list = field(default_factory=list)
    val_losses: list = field(default_factory=list)
    reports: list = field(default_factory=list)
    test_loss: Optional[float] = None
    trained_tokens: int = 0
    train_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.trained_tokens / self.train_seconds if self.train_seconds else 0.0


def training_args(options: TrainOptions):
    """mlx-lm's TrainingArgs for these options."""
    from mlx_lm.tuner.trainer import TrainingArgs

    return TrainingArgs(
        batch_size=options.batch_size,
        iters=options.iters,
        val_batches=options.val_batches,
        steps_per_report=options.steps_per_report,
        steps_per_eval=options.steps_per_eval,
        steps_per_save=options.save_every,
        max_seq_length=options.max_seq_length,
        grad_checkpoint=options.grad_checkpoint,
        grad_accumulation_steps=options.grad_accumulation_steps,
        clear_cache_threshold=options.clear_cache_threshold,
    )


def fit(
    model,
    optimizer,
    train_set,
    valid_set,
    args,
    *,
    seed: int,
    report,
    start: Optional[StartState] = None,
    save: Optional[Callable] = None,
    loss=None,
    batches: Optional[Callable] = None,
    compiled: bool = True,
    ahead: Optional[bool] = None,
) -> TrainResult:
    """mlx-lm's `train()` loop, started at `start.step`: same batches, loss, compiled step, reports and evals.

    It differs where resuming and data parallelism need it: the data order comes from `seed` alone and is
    replayed up to the start step; with several processes (or gradient accumulation) gradients are
    weighted by their token counts, so that N processes equal one process with the same global batch;
    `save(step, grad_accum, accum_tokens, trained_tokens)` is called every `steps_per_save` steps and at the end.
    `batches` replaces mlx-lm's batching (a vision-language model's, `vlm_data.vlm_batches`), with the same
    arguments; `compiled=False` runs the step uncompiled (mlx-vlm's models read array values while building inputs).
    With `ahead` (default `queue_ahead()`), each step is queued before the one before it is waited for, so the host
    builds a step while the device runs the last; the arithmetic and its order are the same either way.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.nn.utils import average_gradients
    from mlx.utils import tree_map
    from mlx_lm.tuner.trainer import default_loss, evaluate, grad_checkpoint
    from mlx_lm.utils import maybe_set_recommended_wired_limit

    from .data import seeded_batches, skip
    from .groups import run_learning_rate

    loss = loss or default_loss
    start = start or StartState()
    ahead = queue_ahead() if ahead is None else ahead
    maybe_set_recommended_wired_limit()
    world = mx.distributed.init()
    size = world.size()
    if args.grad_checkpoint:
        grad_checkpoint(model.layers[0])
    loss_value_and_grad = nn.value_and_grad(model, loss)
    accum_steps = args.grad_accumulation_steps
    weighted = size > 1 or accum_steps > 1

    state = [model.state, optimizer.state, mx.random.state]

    def step(batch, prev_grad, prev_tokens, do_update):
        (lvalue, toks), grad = loss_value_and_grad(model, *batch)
        tokens = toks.astype(mx.float32)
        if weighted:
            grad = tree_map(lambda g: g * tokens, grad)
        if prev_grad is not None:
            grad = tree_map(mx.add, grad, prev_grad)
            tokens = tokens + prev_tokens
        if do_update:
            if weighted:
                grad = average_gradients(grad)
                mean_tokens = mx.distributed.all_sum(tokens) / size if size > 1 else tokens
                grad = tree_map(lambda g: g / mean_tokens, grad)
            optimizer.update(model, grad)
            return lvalue, toks, None, None
        return lvalue, toks, grad, tokens

    if compiled:
        step = partial(mx.compile, inputs=state, outputs=state)(step)
    order = partial(batches or seeded_batches, seed=seed)
    batches = skip(order(train_set, args.batch_size, args.max_seq_length, loop=True, comm_group=world), start.step)
    result = TrainResult(step=start.step, resumed_from=start.step or None, trained_tokens=0)

    def validate(it: int) -> None:
        tic = time.perf_counter()
        val_loss = evaluate(
            model,
            valid_set,
            args.batch_size,
            args.val_batches,
            args.max_seq_length,
            loss=loss,
            iterate_batches=order,
            clear_cache_threshold=args.clear_cache_threshold,
        )
        model.train()
        result.val_losses.append((it, val_loss))
        report.on_val_loss_report({"iteration": it, "val_loss": val_loss, "val_time": time.perf_counter() - tic})

    model.train()
    if valid_set is not None and start.step == 0 and args.iters > 0:
        validate(0)
    grad, accum_tokens = start.grad_accum, start.accum_tokens
    trained_tokens = start.trained_tokens
    window_loss, window_tokens, window_time, window_steps = mx.array(0.0), mx.array(0.0), 0.0, 0
    in_flight = None
    session_start = time.perf_counter()
    for it in range(start.step + 1, args.iters + 1):
        batch = next(batches)
        tic = time.perf_counter()
        lvalue, toks, grad, accum_tokens = step(batch, grad, accum_tokens, it % accum_steps == 0)
        window_loss = window_loss + lvalue * toks
        window_tokens = window_tokens + toks
        reports = it % args.steps_per_report == 0 or it == args.iters
        validates = valid_set is not None and (it % args.steps_per_eval == 0 or it == args.iters)
        saves = save is not None and (it % args.steps_per_save == 0 or it == args.iters)
        if ahead and not (reports or validates or saves):
            # The device runs this step while the host builds the next; wait only for the step before. A step that
            # reports, validates or saves is waited for whole, so that each window's time holds all its steps.
            mx.async_eval(state, window_loss, window_tokens, grad, accum_tokens)
            if in_flight is not None:
                mx.eval(in_flight)
            in_flight = window_loss
        else:
            mx.eval(state, window_loss, window_tokens, grad, accum_tokens)
        if args.clear_cache_threshold and mx.get_cache_memory() > args.clear_cache_threshold:
            mx.clear_cache()
        window_time += time.perf_counter() - tic
        window_steps += 1

        if reports:
            loss_sum = mx.distributed.all_sum(window_loss, stream=mx.cpu).item()
            tokens = mx.distributed.all_sum(window_tokens, stream=mx.cpu).item()
            trained_tokens += int(tokens)
            result.trained_tokens += int(tokens)
            result.train_seconds += window_time
            train_loss = loss_sum / max(tokens, 1.0)
            result.train_losses.append((it, train_loss))
            elapsed = time.perf_counter() - session_start
            info = {
                "iteration": it,
                "train_loss": train_loss,
                "learning_rate": run_learning_rate(optimizer).item(),
                "iterations_per_second": window_steps / window_time,
                "tokens_per_second": tokens / window_time,
                "trained_tokens": trained_tokens,
                "peak_memory": mx.get_peak_memory() / 1e9,
                "eta_seconds": elapsed / (it - start.step) * (args.iters - it),
            }
            result.reports.append(info)
            report.on_train_loss_report(info)
            window_loss, window_tokens, window_time, window_steps = mx.array(0.0), mx.array(0.0), 0.0, 0

        if validates:
            validate(it)
        result.step = it
        if saves:
            save(it, grad, accum_tokens, trained_tokens)
    return result


def queue_ahead() -> bool:
    """Whether the loop queues each step before waiting for the last: ADAPTERSPEC_TRAIN_AHEAD=1. Off by default until a
    GPU shows it pays and keeps the peak memory (`benchmarks/train_step.py`, `loop` against `ahead`)."""
    return os.environ.get("ADAPTERSPEC_TRAIN_AHEAD", "0") == "1"


def evaluate_split(model, dataset, options: TrainOptions, num_batches: int, loss=None, batches=None) -> float:
    """mlx-lm's `evaluate` over `num_batches` batches (-1: all) in the seeded order; token-weighted mean loss."""
    from mlx_lm.tuner.trainer import default_loss, evaluate

    from .data import seeded_batches

    return evaluate(
        model,
        dataset,
        options.batch_size,
        num_batches,
        options.max_seq_length,
        loss=loss or default_loss,
        iterate_batches=partial(batches or seeded_batches, seed=options.seed),
    )


def build_optimizer(options: TrainOptions, plan=None, parameters: Optional[dict] = None):
    """The optimizer mlx_lm.lora builds for these options (learning rate or lr_schedule, optimizer_config);
    given the plan and the trainable parameters, one per group of the spec's per-rule settings (`groups`)."""
    import mlx.optimizers as optim
    from mlx_lm.tuner.utils import build_schedule

    from .groups import grouped_optimizer

    classes = {
        "adam": optim.Adam,
        "adamw": optim.AdamW,
        "muon": optim.Muon,
        "sgd": optim.SGD,
        "adafactor": optim.Adafactor,
    }
    try:
        learning_rate = build_schedule(options.lr_schedule) if options.lr_schedule else options.learning_rate
        make = classes[options.optimizer]
        if plan is None:
            return make(learning_rate=learning_rate, **options.optimizer_settings)
        return grouped_optimizer(make, options.optimizer, learning_rate, options.optimizer_settings, plan, parameters)
    except (AttributeError, TypeError, KeyError, ValueError) as error:
        raise UserError(
            f"cannot build the {options.optimizer} optimizer: {error}", help="check optimizer_config and lr_schedule"
        ) from None
