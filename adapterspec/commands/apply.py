"""`adapterspec apply MODEL SPEC -o DIR`: a fresh (or given) adapter directory for a model, or with
`--adapters … --fuse` a fused model directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import EXIT_ERRORS, EXIT_OK, UserError
from .common import check_argument_order, print_diagnostics, seed, spec_or_exit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a local mlx-lm model directory (or a repo id in the local cache)")
    parser.add_argument("spec", help="the spec file (.aspec)")
    parser.add_argument(
        "-o", "--output", required=True, help="the adapter directory to write (with --fuse: the model directory)"
    )
    parser.add_argument("--seed", type=seed, default=0, help="seed of the adapters' random initialisation (default 0)")
    parser.add_argument(
        "--adapters",
        help="trained adapter weights to use instead of fresh ones: an adapter directory or a .safetensors file",
    )
    parser.add_argument(
        "--fuse", action="store_true", help="fuse the adapters into the model and write a model directory"
    )
    parser.add_argument("--dequantize", action="store_true", help="with --fuse: write the fused model unquantized")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--strict", action="store_true", help="fail (exit 1) on warnings too")


def adapter_weights_file(path: str) -> Path:
    """The weights of --adapters: a safetensors file, or an adapter directory's (its config checked too)."""
    from ..model.adapter_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_weights_file, read_adapter_config

    given = Path(path)
    if given.is_dir():
        if (given / ADAPTER_CONFIG).exists() or (given / ADAPTER_CONFIG).is_symlink():
            read_adapter_config(given)
        return check_weights_file(given / ADAPTER_WEIGHTS)
    if not given.is_file():
        raise UserError(
            f"{path}: no adapter weights found", help=f"pass an adapter directory or a {ADAPTER_WEIGHTS} file"
        )
    return given


def rescaled_modules(adapters: str, plan) -> str:
    """In words, the modules to which the spec gives another scale than the one their given adapters were saved
    with ('' when none, or when the weights come without a config)."""
    from ..model.adapter_format import ADAPTER_CONFIG, saved_scales

    directory = Path(adapters)
    if not (directory / ADAPTER_CONFIG).is_file():
        return ""
    scales = saved_scales(directory)
    saved_with = [(e.path, scales.get(e.path, scales.get("*")), e.scale) for e in plan.entries]
    changed = [
        (path, saved, given) for path, saved, given in saved_with if None not in (saved, given) and saved != given
    ]
    if not changed:
        return ""
    path, saved, given = changed[0]
    return (
        f"the spec gives {len(changed)} module(s) another scale than their adapters in {adapters} were saved with, "
        f"e.g. '{path}': {given:g} instead of {saved:g}, {given / saved:.3g}× the trained effect"
        if saved
        else f"the spec gives '{path}' scale {given:g}; its adapters in {adapters} were saved with scale 0"
    )


def run(args) -> int:
    import mlx.core as mx

    from ..adapters.install import apply, plan_for_model
    from ..adapters.loading import load_model
    from ..adapters.weights import install_weights, save_adapters
    from ..fuse.run import fused_model_files
    from ..language.diagnostics import SpecError
    from ..model.adapter_format import ADAPTER_DIR_FILES, saved_plan
    from ..model.files import resolve_model_path
    from ..outputs import check_output_dir
    from .reports import render

    if args.dequantize and not args.fuse:
        raise UserError("--dequantize needs --fuse", help="an adapter directory keeps the model's weights as they are")
    if args.fuse and not args.adapters:
        raise UserError(
            "--fuse needs trained adapters",
            help="add --adapters DIR_OR_FILE (fresh adapters would fuse to the unchanged model)",
        )
    model_dir = resolve_model_path(args.model)
    protect = [model_dir, args.spec] + ([args.adapters] if args.adapters else [])
    produces = fused_model_files(model_dir) if args.fuse else ADAPTER_DIR_FILES
    check_output_dir(args.output, force=args.force, protect=protect, produces=produces)
    check_argument_order(args.model, args.spec, "apply")
    spec, diagnostics, text, code = spec_or_exit(args.spec)
    if spec is None:
        return code
    model, _config = load_model(model_dir)
    try:
        plan = plan_for_model(model, spec)
    except SpecError as error:
        print_diagnostics(list(diagnostics) + error.diagnostics, text, args.spec)
        return EXIT_ERRORS
    all_diagnostics = list(diagnostics) + plan.diagnostics
    print_diagnostics(all_diagnostics, text, args.spec)
    if args.strict and all_diagnostics:
        return EXIT_ERRORS
    if not args.adapters:
        mx.random.seed(args.seed)
        apply(model, plan)
        save_adapters(model, plan, args.output, force=args.force, protect=protect)
        print(render(plan, verbose=False))
        print(f"\nwrote fresh adapters (seed {args.seed}) to {args.output}")
        return EXIT_OK
    weights = adapter_weights_file(args.adapters)
    plan = saved_plan(plan)  # given weights are saved adapters: PiSSA / OLoRA ones as their plain rank-2r delta
    rescaled = rescaled_modules(args.adapters, plan)
    if rescaled:
        print(f"warning: {rescaled}", file=sys.stderr)
        if args.strict:
            return EXIT_ERRORS
    if args.fuse:
        from ..fuse.adapter_source import AdapterSource
        from ..fuse.progress import progress_for
        from ..fuse.run import fuse_model_dir
        from .reports import print_outcome

        result = fuse_model_dir(
            model_dir,
            AdapterSource.from_plan(plan, weights),
            args.output,
            dequantize=args.dequantize,
            force=args.force,
            progress=progress_for(sys.stderr),
            protect=protect,
        )
        print(result.report.render(full=False))
        print_outcome(result, args.output)
    else:
        install_weights(model, plan, weights)
        save_adapters(model, plan, args.output, force=args.force, protect=protect)
        print(f"wrote the given adapters with this spec to {args.output}", file=sys.stderr)
    return EXIT_OK
