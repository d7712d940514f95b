"""The `adapterspec` command line: `main(argv=None) -> int`; each subcommand lives in `commands/`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from importlib import import_module

from . import __version__
from .errors import EXIT_BUG, EXIT_ERRORS, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, UserError, missing_extra
from .language.diagnostics import SpecError

COMMANDS = {
    "lint": "check spec files (and, with --model, match them against a model)",
    "fmt": "rewrite spec files in canonical layout (--check: only report)",
    "tree": "show a model's module tree, and what a selector matches",
    "plan": "show which modules a spec adapts, with what, and the trainable parameters",
    "apply": "apply a spec to a model and write a fresh adapter directory (or --fuse a model)",
    "fuse": "merge trained adapters into a model's weights and write a model directory",
    "verify": "check that a fused model keeps the adapters' effect on the outputs",
    "import": "translate a PEFT or mlx-lm adapter config into a spec (and PEFT weights into adapters)",
    "export": "write adapters trained with adapterspec as a PEFT adapter directory",
    "explain": "for each module, the rule that decides it and why other rules do not",
    "train": "train the adapters of a spec on a dataset (mlx-lm's trainer)",
}
COMMAND_MODULES = {"import": "import_"}


def chosen_command(argv: list[str]) -> str | None:
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only the chosen subcommand's module is imported (keeps `lint` light)."""
    parser = argparse.ArgumentParser(
        prog="adapterspec",
        description="Declarative adapter specs for MLX: lint, plan, apply, fuse.",
    )
    parser.add_argument("--version", action="version", version=f"adapterspec {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="print the traceback of an internal error (or set ADAPTERSPEC_DEBUG=1)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = import_module(f".commands.{COMMAND_MODULES.get(name, name)}", __package__)
            module.add_arguments(sub)
            sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = chosen_command(argv)
    debug = "--debug" in argv or os.environ.get("ADAPTERSPEC_DEBUG") == "1"
    try:
        parser = build_parser(command)
    except BaseException as error:  # noqa: BLE001 (a command module that cannot load: the light install)
        return report_failure(error, command or "", debug)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return int(exit.code or 0) if exit.code in (0, None) else EXIT_USAGE
    if not getattr(args, "run", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.run(args))
    except BaseException as error:  # noqa: BLE001 (the one boundary: every failure becomes a message and an exit code)
        return report_failure(error, args.command, debug)


def report_failure(error: BaseException, command: str, debug: bool) -> int:
    """Print what went wrong the way a user can act on it, and return the exit code; a bug prints one line asking
    for a report (and the traceback with --debug)."""
    if isinstance(error, ModuleNotFoundError) and missing_extra(error) is not None:
        error = missing_extra(error)
    if isinstance(error, UserError):
        print(f"adapterspec {command}: error: {error.message}", file=sys.stderr)
        if error.help:
            print(f"  help: {error.help}", file=sys.stderr)
        return error.exit_code
    if isinstance(error, SpecError):
        print(error.render(), file=sys.stderr)
        return EXIT_ERRORS
    if isinstance(error, KeyboardInterrupt):
        print(f"adapterspec {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(error, SystemExit):
        raise error
    if isinstance(error, BrokenPipeError):
        _silence_stdout()
        return EXIT_OK
    if isinstance(error, MemoryError):
        print(f"adapterspec {command}: error: out of memory", file=sys.stderr)
        print("  help: close other programs, or use a machine with more memory", file=sys.stderr)
        return EXIT_ERRORS
    if isinstance(error, OSError):  # a full disk, a vanished file: the system's words, not a traceback
        where = f" ({error.filename})" if error.filename else ""
        print(f"adapterspec {command}: error: {error.strerror or error}{where}", file=sys.stderr)
        print("  help: check the free space and permissions where it reads and writes", file=sys.stderr)
        return EXIT_ERRORS
    print(f"adapterspec {command}: internal error: {type(error).__name__}: {error}", file=sys.stderr)
    print(
        "  this is a bug in adapterspec: please report it with the command you ran"
        + ("" if debug else " and the output of the same command with --debug"),
        file=sys.stderr,
    )
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    return EXIT_BUG


def _silence_stdout() -> None:
    """After the reader of stdout went away (`| head`), point stdout at /dev/null so that exiting does not fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def entry() -> None:
    """The `adapterspec` program: an interrupt always interrupts (a parent may have started it with SIGINT
    ignored, as some CI runners do), then `main`."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    code = main()
    # The work is done (or abandoned and cleaned up): an interrupt during the shutdown has nothing left to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from .process_end import hand_over_device_files

    hand_over_device_files()  # the caller gets the exit code without waiting for the GPU's teardown
    if code == EXIT_INTERRUPTED:
        # CPython ends a process whose interrupt landed inside some of its own machinery (an import, an exec) by
        # killing itself with SIGINT at exit, whatever code it was given; leave with the documented code instead.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
