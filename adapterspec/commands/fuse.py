"""`adapterspec fuse MODEL ADAPTERS -o OUT`: merge trained adapters into a model's weights, streaming, atomically."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import sys
from pathlib import Path

from ..errors import EXIT_OK, UserError
from ..inputs import open_regular
from .reports import add_verify_arguments, print_outcome, verify_sequences

SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "m": 1e6,
    "g": 1e9,
    "t": 1e12,
    "ki": 1 << 10,
    "mi": 1 << 20,
    "gi": 1 << 30,
    "ti": 1 << 40,
}


EPILOG = """\
Every fused module is measured for how much of its adapter the stored weights keep (requantizing
can round a small change away, or replace it by rounding noise); modules that keep less than half
of it, or whose stored change is no closer to it than no change, are a warning, or with --strict an
error. The output appears only when complete: an interrupted fuse leaves nothing at OUT, and a
killed one leaves a hidden .OUT.tmp-* directory beside it that the next fuse to OUT removes."""


def add_arguments(parser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("model", help="the base model: a directory in mlx-lm's layout, or a locally cached repo id")
    parser.add_argument("adapters", help="the adapter directory (adapterspec's or mlx-lm's)")
    parser.add_argument(
        "-o", "--output", required=True, help="the model directory to write (must not exist or be empty)"
    )
    parser.add_argument("--dequantize", action="store_true", help="write every weight unquantized")
    parser.add_argument(
        "--requantize", choices=("grid", "plain"), default="grid",
        help="grid (default): a fused quantization group stays on the base's own grid (scale and bias) where it "
        "fits it, so every group the adapter does not move keeps its bits; plain: every group requantized afresh, "
        "as mlx_lm fuse does",
    )  # fmt: skip
    parser.add_argument(
        "--keep-precision", choices=("never", "auto", "fit"), default="never",
        help="auto: write unquantized only the fused modules whose adapter requantization would erase; fit: store "
        "each of them in the cheapest finer quantization (bits, group size) that keeps it, unquantized where none does",
    )  # fmt: skip
    parser.add_argument(
        "--strict", action="store_true", help="fail (exit 1, nothing written) when a module loses most of its adapter"
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--report-json", metavar="FILE", help="also write the erasure report as JSON to FILE")
    parser.add_argument(
        "--full-report", action="store_true", help="one report row per module instead of per module name"
    )
    parser.add_argument(
        "--max-shard-size",
        default="5GiB",
        metavar="SIZE",
        help="largest weight file to write (default 5GiB, as mlx-lm)",
    )
    parser.add_argument(
        "--verify", action="store_true",
        help="before publishing, run the adapted and the fused model on the same tokens and compare them "
        "(with --strict: exit 1, nothing written, when the fused model does not keep the adapters' effect)",
    )  # fmt: skip
    add_verify_arguments(parser, "--verify-data")
    parser.add_argument(
        "--device", choices=("auto", "gpu", "cpu"), default="auto",
        help="where the merges run: auto (default) takes mlx's GPU where it has one. Dense weights and quantized "
        "groups left on the base's grid come out bit for bit as on the CPU; a freshly quantized group may differ "
        "by one quantization step",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="print no report and no progress")


def run(args) -> int:
    from ..fuse.progress import Progress, progress_for
    from ..fuse.run import ErasureError, VerifyError, fuse_model_dir
    from ..outputs import check_output_file

    max_shard_bytes = parse_size(args.max_shard_size)
    if args.report_json:
        check_output_file(args.report_json, protect=[args.model, args.adapters, args.output])
        if Path(args.report_json).exists() and not is_erasure_report(Path(args.report_json)):
            raise UserError(
                f"refusing to overwrite {args.report_json}: it is not an erasure report that adapterspec fuse wrote",
                help="name a new file for --report-json",
            )
    progress = Progress() if args.quiet else progress_for(sys.stderr)
    verify = verify_sequences(args, args.model) if args.verify else None
    try:
        with _sigterm_interrupts():
            result = fuse_model_dir(
                args.model, args.adapters, args.output,
                dequantize=args.dequantize, requantization=args.requantize, keep_precision=args.keep_precision,
                strict=args.strict,
                force=args.force, max_shard_bytes=max_shard_bytes, progress=progress, verify=verify,
                device=args.device,
            )  # fmt: skip
    except ErasureError as error:
        _show_report(error.report, args)
        raise
    except VerifyError as error:
        _show_report(error.erasure, args, error.report)
        raise
    _show_report(result.report, args, result.verified)
    print_outcome(result, args.output)
    return EXIT_OK


def is_erasure_report(path: Path) -> bool:
    """Whether a file holds a report that `fuse --report-json` wrote (and so may be replaced by the next one)."""
    try:
        with open_regular(path) as file:
            data = json.loads(file.read(64 << 20))
    except (UserError, OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and {"thresholds", "counts", "modules"} <= data.keys()


def _show_report(report, args, verified=None) -> None:
    if args.report_json:
        from ..outputs import write_json_atomic

        data = report.to_json()
        if verified is not None:
            data["verify"] = verified.to_json()
        write_json_atomic(args.report_json, data, indent=2)
    if not args.quiet:
        print(report.render(full=args.full_report))
        if verified is not None:
            print(verified.render())


def parse_size(text: str) -> int:
    """Bytes of a size such as 5GiB, 500MB or 1048576."""
    match = SIZE.match(text)
    unit = match.group(2).lower().rstrip("b") if match else None
    if match is None or unit not in UNITS or float(match.group(1)) <= 0:
        raise UserError(f"--max-shard-size: cannot read {text!r} as a size", help="write e.g. 5GiB, 500MB or 1048576")
    return int(float(match.group(1)) * UNITS[unit])


@contextlib.contextmanager
def _sigterm_interrupts():
    """Turn SIGTERM into KeyboardInterrupt, so that a terminated fuse cleans up like an interrupted one."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
