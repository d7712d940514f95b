"""`adapterspec import peft|mlx-lm PATH`: a spec (and, for PEFT, converted adapters) from another tool's adapter config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import EXIT_OK, UserError
from ..outputs import write_file_atomic

SOURCES = ("peft", "mlx-lm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", choices=SOURCES, help="the tool that wrote the adapter")
    parser.add_argument(
        "path",
        help="PEFT: the adapter directory; mlx-lm: the adapter directory, its "
        "adapter_config.json, or an mlx_lm.lora YAML config",
    )
    parser.add_argument("-o", "--output", help="the spec file to write (default, or '-': print it)")
    parser.add_argument(
        "--model",
        help="the mlx-lm model directory (or cached repo id) to resolve names against and check the translation on",
    )
    parser.add_argument(
        "--adapters-out", metavar="DIR", help="PEFT: also convert the weights into this adapter directory"
    )
    parser.add_argument(
        "--allow-lossy",
        action="store_true",
        help="write the result even when the source says things a spec cannot (they become comments)",
    )
    parser.add_argument(
        "--peft-layout",
        choices=("per-expert", "target-parameters"),
        help="PEFT: how the adapter saw mixture-of-experts layers: one module per expert (transformers 4) or fused "
        "parameters (transformers 5, target_parameters); default: read from the adapter and the model's config.json",
    )
    parser.add_argument("--force", action="store_true", help="replace existing output files")


STDOUT = "-"


def check_outputs(args) -> None:
    """Refuse, before any work, outputs that overlap the inputs or each other, or would replace a file without
    --force."""
    from ..model.adapter_format import ADAPTER_DIR_FILES
    from ..outputs import check_output_dir, check_output_file

    inputs = input_paths(args)
    spec_file = args.output if args.output not in (None, STDOUT) else None
    if spec_file and args.adapters_out:
        refuse_shared_output(spec_file, args.adapters_out)
    if spec_file:
        check_output_file(spec_file, protect=inputs)
        if Path(spec_file).exists() and not args.force:
            raise UserError(f"{spec_file} exists", help="pass --force to replace it")
    if args.adapters_out:
        check_output_dir(args.adapters_out, force=args.force, protect=inputs, produces=ADAPTER_DIR_FILES)


def input_paths(args) -> list[str]:
    """What the outputs must stay clear of: the source (a PEFT adapter's whole directory, also when its
    adapter_config.json is named) and the model directory."""
    source = Path(args.path)
    if args.source == "peft" and source.is_file():
        source = source.parent
    return [str(source)] + ([args.model] if args.model and Path(args.model).exists() else [])


def refuse_shared_output(spec_file: str, adapters_out: str) -> None:
    """The spec file and the adapter directory must be apart: neither the same path nor one inside the other."""
    spec, adapters = (Path(p).expanduser().resolve() for p in (spec_file, adapters_out))
    if spec == adapters or adapters in spec.parents or spec in adapters.parents:
        raise UserError(
            f"-o {spec_file} and --adapters-out {adapters_out} overlap: the spec file and the adapter directory "
            "need paths of their own",
            help="write the spec beside the adapter directory, e.g. -o spec.aspec --adapters-out adapters",
        )


def write_spec(text: str, output: str | None) -> None:
    if output in (None, STDOUT):
        sys.stdout.write(text)
        return
    write_file_atomic(output, text)


def report(findings, allow_lossy: bool) -> None:
    for finding in findings:
        print(f"adapterspec import: {finding.render()}", file=sys.stderr)
    lossy = [f for f in findings if f.lossy]
    if lossy and not allow_lossy:
        raise UserError(
            f"the adapter says {len(lossy)} thing(s) a spec cannot (listed above); nothing was written",
            help="pass --allow-lossy to write the closest spec anyway",
        )


def run(args) -> int:
    check_outputs(args)
    if args.source == "mlx-lm":
        return run_mlx_lm(args)
    from ..interop.peft import import_peft, write_imported_adapters

    result = import_peft(args.path, args.model, need_model=bool(args.adapters_out), layout=args.peft_layout)
    check_clear_of_model(args, result.model_dir)
    report(result.findings, args.allow_lossy)
    if result.plan is not None and not result.plan.ok:
        from .common import print_diagnostics

        print_diagnostics(result.plan.diagnostics, result.text, "<imported spec>")
        raise UserError("the imported spec does not plan cleanly on this model", help="please report this as a bug")
    if args.adapters_out:
        write_imported_adapters(result, args.path, args.adapters_out, force=args.force)
        print(
            f"adapterspec import: wrote {len(result.plan.entries)} adapted modules to {args.adapters_out}",
            file=sys.stderr,
        )
    write_spec(result.text, args.output)
    return EXIT_OK


def check_clear_of_model(args, model_dir) -> None:
    """The spec file against the model the import found by itself (the config's base_model_name_or_path); the
    adapter directory is checked against it before anything is written."""
    from ..outputs import check_output_file

    if model_dir is not None and args.output not in (None, STDOUT):
        check_output_file(args.output, protect=[model_dir])


def run_mlx_lm(args) -> int:
    from ..interop.mlxlm_import import read_mlx_lm_config, translate

    if args.adapters_out or args.peft_layout:
        raise UserError(
            f"{'--adapters-out' if args.adapters_out else '--peft-layout'} is for PEFT adapters",
            help="mlx-lm adapter directories load as they are: adapterspec.load_adapters(model, DIR)",
        )
    model_name, index = args.model, None
    if model_name:
        from .common import model_index

        index = model_index(model_name)
    config = read_mlx_lm_config(args.path)
    text, findings = translate(config, index, source=Path(args.path).name, model=model_name)
    report(findings, args.allow_lossy)
    write_spec(text, args.output)
    return EXIT_OK
