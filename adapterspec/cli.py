"""The `adapterspec` command line: `main(argv=None) -> int`; each subcommand lives in `commands/`."""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from . import __version__
from .errors import EXIT_ERRORS, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, UserError
from .language.diagnostics import SpecError

COMMANDS = {
    "lint": "check spec files (and, with --model, match them against a model)",
    "fmt": "rewrite spec files in canonical layout (--check: only report)",
    "tree": "show a model's module tree, and what a selector matches",
    "plan": "show which modules a spec adapts, with what, and the trainable parameters",
    "apply": "apply a spec to a model and write a fresh adapter directory (or --fuse a model)",
    "fuse": "merge trained adapters into a model's weights and write a model directory",
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
    parser = build_parser(chosen_command(argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return int(exit.code or 0) if exit.code in (0, None) else EXIT_USAGE
    if not getattr(args, "run", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.run(args))
    except UserError as error:
        print(f"adapterspec {args.command}: error: {error.message}", file=sys.stderr)
        if error.help:
            print(f"  help: {error.help}", file=sys.stderr)
        return error.exit_code
    except SpecError as error:
        print(error.render(), file=sys.stderr)
        return EXIT_ERRORS
    except KeyboardInterrupt:
        print(f"adapterspec {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except OSError as error:  # a full disk, a vanished file: the system's words, not a traceback
        where = f" ({error.filename})" if error.filename else ""
        print(f"adapterspec {args.command}: error: {error.strerror or error}{where}", file=sys.stderr)
        print("  help: check the free space and permissions where it reads and writes", file=sys.stderr)
        return EXIT_ERRORS


if __name__ == "__main__":
    sys.exit(main())
