"""`adapterspec train MODEL SPEC --data DIR -o DIR`: train a spec's adapters with mlx-lm's trainer,
with mlx_lm.lora's option names, resumable checkpoints and data-parallel processes (mlx.launch)."""

from __future__ import annotations

import argparse
import sys

from ..errors import EXIT_INTERRUPTED, EXIT_OK, UserError
from ..train.options import OPTIMIZERS
from .common import seed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="a local mlx-lm model directory (or a repo id in the local cache)")
    parser.add_argument("spec", nargs="?", help="the spec file (.aspec) saying which modules get which adapters")
    parser.add_argument(
        "--data", metavar="DIR", help="directory with train.jsonl, valid.jsonl (and test.jsonl), in mlx-lm's formats"
    )
    parser.add_argument(
        "-o",
        "--output",
        "--adapter-path",
        dest="adapter_path",
        metavar="DIR",
        help="the adapter directory to write; checkpoints go to its checkpoints/ (default: adapters)",
    )
    parser.add_argument(
        "-c", "--config", metavar="FILE", help="a YAML file of options, as mlx_lm.lora reads it (the command line wins)"
    )
    group = parser.add_argument_group("training (as mlx_lm.lora)")
    group.add_argument("--iters", type=int, help="iterations (batches) to train for (default 1000)")
    group.add_argument("--batch-size", type=int, help="global minibatch size (default 4)")
    group.add_argument("--learning-rate", type=float, help="the optimizer's learning rate (default 1e-5)")
    group.add_argument("--optimizer", choices=OPTIMIZERS, help="default adam; its settings: optimizer_config in -c")
    group.add_argument(
        "--grad-accumulation-steps", type=int, help="batches to accumulate before each update (default 1)"
    )
    group.add_argument("--max-seq-length", type=int, help="longer examples are truncated (default 2048)")
    group.add_argument(
        "--mask-prompt",
        action="store_true",
        default=None,
        help="leave the prompt out of the loss (completions and chat data)",
    )
    group.add_argument(
        "--grad-checkpoint", action="store_true", default=None, help="gradient checkpointing: less memory, more compute"
    )
    group.add_argument(
        "--clear-cache-threshold", type=_size, help="clear the allocator cache when it grows past this (e.g. 2GB)"
    )
    group.add_argument(
        "--memory-limit",
        type=_size,
        help="MLX's memory limit (e.g. 20GB): past it, each step waits for the device instead of queueing more work"
        " ahead, which bounds the peak (docs/training.md)",
    )
    group.add_argument(
        "--seed", type=seed, help="seed of the adapters' initialisation, dropout and the data order (default 0)"
    )
    group = parser.add_argument_group("reports and evaluation")
    group.add_argument("--steps-per-report", type=int, help="steps between progress lines (default 10)")
    group.add_argument("--steps-per-eval", type=int, help="steps between validations (default 200)")
    group.add_argument("--val-batches", type=int, help="validation batches, -1 for the whole set (default 25)")
    group.add_argument(
        "--test", action="store_true", default=None, help="report the test loss and perplexity after training"
    )
    group.add_argument("--test-batches", type=int, help="test batches, -1 for the whole set (default 500)")
    group.add_argument("--report-to", help="also report to wandb and/or swanlab (comma-separated), as mlx_lm.lora")
    group.add_argument("--project-name", help="project name for --report-to")
    group = parser.add_argument_group("checkpoints")
    group.add_argument(
        "--save-every", type=int, help="write a checkpoint every N steps (default 100); one is written at the end too"
    )
    group.add_argument("--keep-checkpoints", type=int, help="keep only the newest N checkpoints (default 0: keep all)")
    group.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue the run in the output directory from its newest checkpoint",
    )
    group.add_argument(
        "--resume-adapter-file", help="start from these adapter weights (a .safetensors file or an adapter directory)"
    )
    group.add_argument(
        "--force", action="store_true", default=None, help="start over in a non-empty output directory (replaces it)"
    )


def _size(text: str) -> int:
    """A size in bytes, as mlx_lm.lora reads one (`2GB`, `512MB`, `1000`)."""
    from mlx_lm.utils import _parse_size

    try:
        size = _parse_size(text)
    except (ArithmeticError, LookupError, ValueError):  # mlx-lm's parse raises decimal's errors and KeyError
        size = None
    if not isinstance(size, int) or size < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 2GB, 512MB)")
    return size


def run(args) -> int:
    from ..train.options import merge_options, read_yaml_config
    from ..train.run import run as train_run

    given = {k: v for k, v in vars(args).items() if k not in ("command", "run", "config", "debug")}
    config = read_yaml_config(args.config) if args.config else {}
    options, notes = merge_options(given, config)
    for note in notes:
        print(f"adapterspec train: note: {note}", file=sys.stderr)
    callback = None
    if options.report_to:
        from mlx_lm.tuner.callbacks import get_reporting_callbacks

        try:
            callback = get_reporting_callbacks(
                options.report_to, project_name=options.project_name, log_dir=options.adapter_path, config=vars(options)
            )
        except (ValueError, ImportError) as error:
            raise UserError(f"--report-to {options.report_to}: {error}") from None
    try:
        train_run(options, training_callback=callback)
    except KeyboardInterrupt:
        print(
            f"adapterspec train: interrupted; continue from the newest checkpoint in {options.adapter_path} with --resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    return EXIT_OK
