"""A training run: the spec, the model and the data put together, the output checked first, the loop (`loop`)
started from scratch or from the newest checkpoint, checkpoints written and the result published."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ..errors import EXIT_ERRORS, UserError
from .groups import group_table
from .loop import TrainResult, build_optimizer, evaluate_split, fit, training_args
from .options import TrainOptions
from .state import StartState, put_weights, rank0_outcome, resume, rng_key

# ── optimizer ───────────────────────────────────────────────────────────────


# ── a whole run ─────────────────────────────────────────────────────────────


def run_identity(options: TrainOptions, plan, train_set) -> dict:
    """The settings and inputs a checkpoint must share with the run that resumes it."""
    from .data import data_fingerprint

    return {
        **options.trajectory(),
        "train_examples": len(train_set),
        "train_sha256": data_fingerprint(options.data),
        "plan": [
            [e.path, e.adapter, e.r, e.scale, e.dropout, *([e.training_json()] if e.training_json() else [])]
            for e in plan.entries
        ],
    }


def check_fresh_output(out: Path, options: TrainOptions, protect: list) -> None:
    """Refuse, before anything is loaded or written, an output directory a fresh run may not take: a non-empty one
    without --force, one holding files no run writes, one overlapping an input. What is there stays until the
    run's first checkpoint replaces it (`first_checkpoint`)."""
    from ..outputs import check_output_dir

    try:
        check_output_dir(out, force=options.force, protect=protect, produces=run_files())
    except UserError as error:
        if "not empty" in error.message:
            raise UserError(
                f"refusing to start a new run in {out}: the directory is not empty",
                help="pass --resume to continue the run in it, or --force to start over",
            ) from None
        raise


def run_files() -> tuple[str, ...]:
    """What a training run writes in its output directory: the adapters and the checkpoints."""
    from ..model.adapter_format import ADAPTER_DIR_FILES
    from .checkpoint import CHECKPOINTS

    return (*ADAPTER_DIR_FILES, CHECKPOINTS)


def first_checkpoint(out: Path, force: bool, write) -> Path:
    """The first checkpoint of a fresh run, written (`write(directory)` returns its path there) into a new
    directory that then replaces `out` at once: until this point a failed or interrupted run leaves `out` as it
    was (a previous run under --force, or nothing)."""
    from ..outputs import atomic_output_dir

    with atomic_output_dir(out, force=force, produces=run_files()) as tmp:
        written = write(tmp)
    return Path(out) / written.relative_to(tmp)


def initial_weights(model, path: str, plan) -> None:
    """--resume-adapter-file: start from given adapter weights (a .safetensors file or an adapter directory)."""
    import mlx.core as mx

    from ..adapters.inits import trained_weights
    from ..model.adapter_format import ADAPTER_WEIGHTS

    file = Path(path) / ADAPTER_WEIGHTS if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise UserError(
            f"{path}: no adapter weights found",
            help=f"pass a .safetensors file or a directory holding {ADAPTER_WEIGHTS}",
        )
    try:
        weights = mx.load(str(file), format="safetensors")
    except (ValueError, RuntimeError) as error:
        raise UserError(
            f"{file}: not a readable safetensors file ({error})",
            help=f"pass adapter weights: a .safetensors file or a directory holding {ADAPTER_WEIGHTS}",
        ) from None
    put_weights(model, trained_weights(plan, weights), str(file))


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
        f"data       {options.data or options.dataset.get('hf_dataset')}: "
        + ", ".join(f"{n} {name}" for name, n in zip(("train", "valid", "test"), sizes) if n)
        + ("" if sizes[1] else ", no validation set"),
        f"optimizer  {options.optimizer}, learning rate {lr}",
        f"batch      {options.batch_size}"
        + (f" over {world_size} processes" if world_size > 1 else "")
        + (f", {options.grad_accumulation_steps} accumulation steps" if options.grad_accumulation_steps > 1 else "")
        + f", {options.iters:,} iterations, max sequence length {options.max_seq_length:,}",
        f"output     {options.adapter_path}",
    ]


def run(options: TrainOptions, *, stream=None, training_callback=None) -> TrainResult:
    """`adapterspec train`: load the model, apply the spec, load the data, train (or resume), save, test."""
    import mlx.core as mx

    from ..adapters.install import apply, plan_for_model
    from ..adapters.loading import load_model, load_processor, load_tokenizer, vision_language
    from ..model.files import resolve_model_path
    from .checkpoint import prune, publish, save_checkpoint, trainer_arrays
    from .data import attention_multiple, check_local_data, load_datasets
    from .report import ProgressReport

    world = mx.distributed.init()
    rank, world_size = world.rank(), world.size()
    if options.batch_size % world_size:
        raise UserError(
            f"the batch size {options.batch_size} is not divisible by the {world_size} processes",
            help="the batch size is global: each process takes batch_size / processes examples",
        )
    spec, spec_warnings, spec_text = read_spec(options.spec)
    attention_multiple()  # a malformed setting is refused before the model loads
    model_dir = resolve_model_path(options.model)
    if options.data and Path(options.data).exists():
        check_local_data(Path(options.data), options)  # before the model loads: a broken file is found at once
    model, config = load_model(model_dir)
    vlm = vision_language(model, config)
    if vlm:
        from .vlm_data import load_vlm_datasets, vlm_batches, vlm_loss

        train_set, valid_set, test_set = load_vlm_datasets(options, model, load_processor(model_dir, config))
        pieces = {"loss": vlm_loss, "batches": vlm_batches}
    else:
        train_set, valid_set, test_set = load_datasets(options, load_tokenizer(model_dir))
        pieces = {}
    plan = plan_for_model(model, spec)
    if rank == 0:
        print_warnings(spec_warnings + plan.diagnostics, spec_text)
    mx.random.seed(options.seed)
    apply(model, plan)
    out = Path(options.adapter_path)
    report = ProgressReport(options.iters, rank=rank, stream=stream, then=training_callback)
    optimizer = build_optimizer(options, plan, model.trainable_parameters())
    optimizer.init(model.trainable_parameters())
    identity = run_identity(options, plan, train_set)

    if options.resume:
        start = resume(model, optimizer, out, identity, world, plan)
        if start.step > options.iters:
            raise UserError(
                f"the run in {out} is at step {start.step}, past --iters {options.iters}",
                help=f"pass --iters larger than {start.step} to train on",
            )
        report.print(f"resuming from {out / 'checkpoints' / f'{start.step:07d}'} (step {start.step})")
    else:
        start = StartState()
        error = None
        if rank == 0:
            try:
                protect = [model_dir] + ([options.data] if options.data and Path(options.data).exists() else [])
                check_fresh_output(out, options, protect)
            except UserError as failure:
                error = failure
        rank0_outcome(error, world)
        if options.resume_adapter_file:
            initial_weights(model, options.resume_adapter_file, plan)
    fresh = not options.resume  # the first checkpoint of a fresh run replaces the output directory whole
    sizes = tuple(len(s) if s is not None else 0 for s in (train_set, valid_set, test_set))
    for line in header_lines(options, plan, sizes, world_size):
        report.print(line)
    for group, count in group_table(plan, model.trainable_parameters()):
        report.print(f"group      {group.describe()}: {count:,} parameters")

    config_summary = {
        "model": str(options.model),
        "spec": str(options.spec),
        "data": options.data,
        "iters": options.iters,
        **options.trajectory(),
    }

    def save(step: int, grad_accum, accum_tokens, trained_tokens: int) -> None:
        refuse_diverged(model, step, out)  # on every rank: they hold the same weights, and stop together
        if rank != 0:
            return
        arrays = trainer_arrays(optimizer, rng_key(), grad_accum, accum_tokens)
        info = {
            "iters": options.iters,
            "world_size": world_size,
            "trained_tokens": trained_tokens,
            "trajectory": identity,
            "train_loss": result_losses(report.history, "train_loss"),
            "val_loss": result_losses(report.val_history, "val_loss"),
        }
        extra = {"training": {**config_summary, "step": step}}

        def write(directory: Path) -> Path:
            path = save_checkpoint(model, plan, directory, step, info, arrays, extra_config=extra)
            publish(path, directory)
            return path

        nonlocal fresh
        path = first_checkpoint(out, options.force, write) if fresh else write(out)
        fresh = False
        prune(out, options.keep_checkpoints)
        report.on_save(step, path)

    with memory_limit(options.memory_limit):
        result = fit(
            model,
            optimizer,
            train_set,
            valid_set,
            training_args(options),
            seed=options.seed,
            report=report,
            start=start,
            save=save,
            compiled=not vlm,
            **pieces,
        )
    if result.step == start.step:
        save(start.step, start.grad_accum, start.accum_tokens, start.trained_tokens)
    result.out, result.model, result.plan = out, model, plan
    if options.test:
        result.test_loss = evaluate_split(model, test_set, options, options.test_batches, **pieces)
        report.on_test(result.test_loss)
    return result


def refuse_diverged(model, step: int, out: Path) -> None:
    """UserError (exit 1) when the adapters hold NaN or Inf: a diverged run publishes nothing more."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    bad = [name for name, value in tree_flatten(model.trainable_parameters()) if not mx.all(mx.isfinite(value)).item()]
    if bad:
        raise UserError(
            f"training diverged by step {step}: '{bad[0]}' holds NaN or Inf (and {len(bad) - 1} more adapter tensors); "
            f"nothing of this step was written",
            help=f"lower --learning-rate; the newest good checkpoint in {out / 'checkpoints'} resumes with --resume",
            exit_code=EXIT_ERRORS,
        )


def result_losses(history: list, key: str) -> Optional[float]:
    return history[-1][key] if history else None


@contextmanager
def memory_limit(limit: int) -> Iterator[None]:
    """MLX's memory limit set to `limit` bytes (0: left as it is) while training, restored after.

    MLX's evaluation waits for the device once more than the limit is in use. A GPU runs behind the host, and every
    buffer that a queued kernel reads stays allocated until the kernel ran, so without a limit a compiled step can
    hold the transient arrays of many layers at once (docs/benchmarks.md measures it).
    """
    import mlx.core as mx

    if not limit:
        yield
        return
    previous = mx.set_memory_limit(limit)
    try:
        yield
    finally:
        mx.set_memory_limit(previous)
