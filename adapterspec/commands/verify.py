"""`adapterspec verify MODEL ADAPTERS FUSED`: whether a fused model keeps the adapters' effect on the outputs."""

from __future__ import annotations

from ..errors import EXIT_ERRORS, EXIT_OK
from .reports import add_verify_arguments, verify_sequences

EPILOG = """\
Runs the base model, the base with the adapters, and the fused model on the same token sequences (one
model in memory at a time) and compares their next-token distributions: top-1 agreement, KL
divergence, the largest logit difference, and how much of the adapters' effect on the
log-probabilities the fused model keeps."""


def add_arguments(parser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("model", help="the base model: a directory in mlx-lm's layout, or a locally cached repo id")
    parser.add_argument("adapters", help="the adapter directory (adapterspec's or mlx-lm's)")
    parser.add_argument("fused", help="the fused model directory")
    add_verify_arguments(parser, "--data")
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when the fused model does not keep the adapters' effect"
    )
    parser.add_argument("--report-json", metavar="FILE", help="also write the comparison as JSON to FILE")


def run(args) -> int:
    from ..fuse.verify import verify_fused
    from ..outputs import check_output_file, write_json_atomic

    if args.report_json:
        check_output_file(args.report_json, protect=[args.model, args.adapters, args.fused])
    sequences, source = verify_sequences(args, args.model)
    report = verify_fused(args.model, args.adapters, args.fused, sequences, source)
    if args.report_json:
        write_json_atomic(args.report_json, {"verify": report.to_json()}, indent=2)
    print(report.render())
    return EXIT_ERRORS if args.strict and not report.keeps_adapter else EXIT_OK
