"""Train a spec's adapters with mlx-lm's machinery (datasets, batches, loss, optimizers, schedules, evaluation),
in a loop that can start at any checkpointed step and averages gradients over `mx.distributed` processes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

from ..errors import UserError
from .options import TrainOptions
from .state import StartState, put_weights, rank0_outcome, resume, rng_key


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


# ── the loop ────────────────────────────────────────────────────────────────


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


def fit(model, optimizer, train_set, valid_set, args, *, seed: int, report, start: Optional[StartState] = None,
        save: Optional[Callable] = None, loss=None) -> TrainResult:
    """mlx-lm's `train()` loop, started at `start.step`: same batches, loss, compiled step, reports and evals.

    It differs where resuming and data parallelism need it: the data order comes from `seed` alone and is
    replayed up to the start step; with several processes (or gradient accumulation) gradients are
    weighted by their token counts, so that N processes equal one process with the same global batch;
    `save(step, grad_accum, accum_tokens, trained_tokens)` is called every `steps_per_save` steps and at the end.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.nn.utils import average_gradients
    from mlx.utils import tree_map
    from mlx_lm.tuner.trainer import default_loss, evaluate, grad_checkpoint
    from mlx_lm.utils import maybe_set_recommended_wired_limit

    from .data import seeded_batches, skip

    loss = loss or default_loss
    start = start or StartState()
    maybe_set_recommended_wired_limit()
    world = mx.distributed.init()
    size = world.size()
    if args.grad_checkpoint:
        grad_checkpoint(model.layers[0])
    loss_value_and_grad = nn.value_and_grad(model, loss)
    accum_steps = args.grad_accumulation_steps
    weighted = size > 1 or accum_steps > 1

    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
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

    order = partial(seeded_batches, seed=seed)
    batches = skip(order(train_set, args.batch_size, args.max_seq_length, loop=True, comm_group=world), start.step)
    result = TrainResult(step=start.step, resumed_from=start.step or None, trained_tokens=0)

    def validate(it: int) -> None:
        tic = time.perf_counter()
        val_loss = evaluate(model, valid_set, args.batch_size, args.val_batches, args.max_seq_length, loss=loss,
                            iterate_batches=order, clear_cache_threshold=args.clear_cache_threshold)
        model.train()
        result.val_losses.append((it, val_loss))
        report.on_val_loss_report({"iteration": it, "val_loss": val_loss, "val_time": time.perf_counter() - tic})

    model.train()
    if valid_set is not None and start.step == 0 and args.iters > 0:
        validate(0)
    grad, accum_tokens = start.grad_accum, start.accum_tokens
    trained_tokens = start.trained_tokens
    window_loss, window_tokens, window_time, window_steps = mx.array(0.0), mx.array(0.0), 0.0, 0
    session_start = time.perf_counter()
    for it in range(start.step + 1, args.iters + 1):
        batch = next(batches)
        tic = time.perf_counter()
        lvalue, toks, grad, accum_tokens = step(batch, grad, accum_tokens, it % accum_steps == 0)
        window_loss = window_loss + lvalue * toks
        window_tokens = window_tokens + toks
        mx.eval(state, window_loss, window_tokens, grad, accum_tokens)
        if args.clear_cache_threshold and mx.get_cache_memory() > args.clear_cache_threshold:
            mx.clear_cache()
        window_time += time.perf_counter() - tic
        window_steps += 1

        if it % args.steps_per_report == 0 or it == args.iters:
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
                "learning_rate": optimizer.learning_rate.item(),
                "iterations_per_second": window_steps / window_time,
                "tokens_per_second": tokens / window_time,
                "trained_tokens": trained_tokens,
                "peak_memory": mx.get_peak_memory() / 1e9,
                "eta_seconds": elapsed / (it - start.step) * (args.iters - it),
            }
            result.reports.append(info)
            report.on_train_loss_report(info)
            window_loss, window_tokens, window_time, window_steps = mx.array(0.0), mx.array(0.0), 0.0, 0

        if valid_set is not None and (it % args.steps_per_eval == 0 or it == args.iters):
            validate(it)
        result.step = it
        if save is not None and (it % args.steps_per_save == 0 or it == args.iters):
            save(it, grad, accum_tokens, trained_tokens)
    return result


def evaluate_split(model, dataset, options: TrainOptions, num_batches: int) -> float:
    """mlx-lm's `evaluate` over `num_batches` batches (-1: all) in the seeded order; token-weighted mean loss."""
    from mlx_lm.tuner.trainer import evaluate

    from .data import seeded_batches

    return evaluate(model, dataset, options.batch_size, num_batches, options.max_seq_length,
                    iterate_batches=partial(seeded_batches, seed=options.seed))


# ── optimizer ───────────────────────────────────────────────────────────────


def build_optimizer(options: TrainOptions):
    """The optimizer mlx_lm.lora builds for these options (learning rate or lr_schedule, optimizer_config)."""
    import mlx.optimizers as optim
    from mlx_lm.tuner.utils import build_schedule

    classes = {"adam": optim.Adam, "adamw": optim.AdamW, "muon": optim.Muon, "sgd": optim.SGD, "adafactor": optim.Adafactor}
    try:
        learning_rate = build_schedule(options.lr_schedule) if options.lr_schedule else options.learning_rate
        return classes[options.optimizer](learning_rate=learning_rate, **options.optimizer_settings)
    except (AttributeError, TypeError, KeyError, ValueError) as error:
        raise UserError(f"cannot build the {options.optimizer} optimizer: {error}", help="check optimizer_config and lr_schedule") from None


# ── a whole run ─────────────────────────────────────────────────────────────


def run_identity(options: TrainOptions, plan, train_set) -> dict:
    """The settings and inputs a checkpoint must share with the run that resumes it."""
    from .data import data_fingerprint

    return {
        **options.trajectory(),
        "train_examples": len(train_set),
        "train_sha256": data_fingerprint(options.data),
        "plan": [[e.path, e.adapter, e.r, e.scale, e.dropout] for e in plan.entries],
    }


def prepare_output(out: Path, options: TrainOptions, protect: list) -> None:
    """Create an empty output directory for a fresh run (replacing a non-empty one only with --force)."""
    from ..outputs import atomic_output_dir

    try:
        with atomic_output_dir(out, force=options.force, protect=protect):
            pass
    except UserError as error:
        if "not empty" in error.message:
            raise UserError(f"refusing to start a new run in {out}: the directory is not empty",
                            help="pass --resume to continue the run in it, or --force to start over") from None
        raise


def initial_weights(model, path: str) -> None:
    """--resume-adapter-file: start from given adapter weights (a .safetensors file or an adapter directory)."""
    import mlx.core as mx

    from ..model.adapter_format import ADAPTER_WEIGHTS

    file = Path(path) / ADAPTER_WEIGHTS if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise UserError(f"{path}: no adapter weights found", help=f"pass a .safetensors file or a directory holding {ADAPTER_WEIGHTS}")
    put_weights(model, mx.load(str(file)), str(file))


def read_spec(path: str):
    """(Spec, its warnings, its text); SpecError when it has errors, UserError when it cannot be read."""
    from ..language.diagnostics import SpecError
    from ..language.lint import check_bytes

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such spec file") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read the spec ({error.strerror})") from None
    spec, diagnostics, text = check_bytes(data, str(path))
    if spec is None:
        raise SpecError(diagnostics, text)
    return spec, diagnostics, text


def print_warnings(diagnostics: list, text: str) -> None:
    """The spec's and the plan's warnings on stderr, each once (the plan repeats the spec's static checks)."""
    import sys

    from ..language.diagnostics import render_text

    seen, shown = set(), []
    for d in diagnostics:
        key = (d.code, d.span.line if d.span else None, d.span.column if d.span else None)
        if key not in seen:
            seen.add(key)
            shown.append(d)
    if shown:
        print(render_text(shown, {d.filename: text for d in shown}), file=sys.stderr)


def header_lines(options: TrainOptions, plan, sizes: tuple, world_size: int) -> list[str]:
    lr = "schedule " + options.lr_schedule["name"] if options.lr_schedule else f"{options.learning_rate:g}"
    share = 100.0 * plan.trainable_parameters / max(plan.total_parameters, 1)
    return [
        f"model      {options.model}",
        f"spec       {options.spec}: {len(plan.entries)} module(s) adapted, "
        f"{plan.trainable_parameters:,} trainable parameters ({share:.3f}% of {plan.total_parameters:,})",
        f"data       {options.data or options.dataset.get('hf_dataset')}: " + ", ".join(f"{n} {name}" for name, n in zip(("train", "valid", "test"), sizes) if n),
        f"optimizer  {options.optimizer}, learning rate {lr}",
        f"batch      {options.batch_size}" + (f" over {world_size} processes" if world_size > 1 else "")
        + (f", {options.grad_accumulation_steps} accumulation steps" if options.grad_accumulation_steps > 1 else "")
        + f", {options.iters:,} iterations, max sequence length {options.max_seq_length:,}",
        f"output     {options.adapter_path}",
    ]


def run(options: TrainOptions, *, stream=None, training_callback=None) -> TrainResult:
    """`adapterspec train`: load the model, apply the spec, load the data, train (or resume), save, test."""
    import mlx.core as mx

    from ..adapters.install import apply, plan_for_model
    from ..adapters.loading import load_model, load_tokenizer
    from ..model.files import resolve_model_path
    from .checkpoint import prune, publish, save_checkpoint, trainer_arrays
    from .data import load_datasets
    from .report import ProgressReport

    world = mx.distributed.init()
    rank, world_size = world.rank(), world.size()
    if options.batch_size % world_size:
        raise UserError(f"the batch size {options.batch_size} is not divisible by the {world_size} processes",
                        help="the batch size is global: each process takes batch_size / processes examples")
    spec, spec_warnings, spec_text = read_spec(options.spec)
    model_dir = resolve_model_path(options.model)
    model, _config = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    train_set, valid_set, test_set = load_datasets(options, tokenizer)
    plan = plan_for_model(model, spec)
    if rank == 0:
        print_warnings(spec_warnings + plan.diagnostics, spec_text)
    mx.random.seed(options.seed)
    apply(model, plan)
    out = Path(options.adapter_path)
    report = ProgressReport(options.iters, rank=rank, stream=stream, then=training_callback)
    optimizer = build_optimizer(options)
    optimizer.init(model.trainable_parameters())
    identity = run_identity(options, plan, train_set)

    if options.resume:
        start = resume(model, optimizer, out, identity, world)
        if start.step > options.iters:
            raise UserError(f"the run in {out} is at step {start.step}, past --iters {options.iters}",
                            help=f"pass --iters larger than {start.step} to train on")
        report.print(f"resuming from {out / 'checkpoints' / f'{start.step:07d}'} (step {start.step})")
    else:
        start = StartState()
        error = None
        if rank == 0:
            try:
                protect = [model_dir] + ([options.data] if options.data and Path(options.data).exists() else [])
                prepare_output(out, options, protect)
            except UserError as failure:
                error = failure
        rank0_outcome(error, world)
        if options.resume_adapter_file:
            initial_weights(model, options.resume_adapter_file)
    sizes = tuple(len(s) if s is not None else 0 for s in (train_set, valid_set, test_set))
    for line in header_lines(options, plan, sizes, world_size):
        report.print(line)

    config_summary = {"model": str(options.model), "spec": str(options.spec), "data": options.data, "iters": options.iters, **options.trajectory()}

    def save(step: int, grad_accum, accum_tokens, trained_tokens: int) -> None:
        if rank != 0:
            return
        arrays = trainer_arrays(optimizer, rng_key(), grad_accum, accum_tokens)
        info = {"iters": options.iters, "world_size": world_size, "trained_tokens": trained_tokens, "trajectory": identity,
                "train_loss": result_losses(report.history, "train_loss"), "val_loss": result_losses(report.val_history, "val_loss")}
        path = save_checkpoint(model, plan, out, step, info, arrays, extra_config={"training": {**config_summary, "step": step}})
        publish(path, out)
        prune(out, options.keep_checkpoints)
        report.on_save(step, path)

    result = fit(model, optimizer, train_set, valid_set, training_args(options), seed=options.seed, report=report,
                 start=start, save=save)
    if result.step == start.step:
        save(start.step, start.grad_accum, start.accum_tokens, start.trained_tokens)
    result.out, result.model, result.plan = out, model, plan
    if options.test:
        result.test_loss = evaluate_split(model, test_set, options, options.test_batches)
        report.on_test(result.test_loss)
    return result


def result_losses(history: list, key: str) -> Optional[float]:
    return history[-1][key] if history else None
