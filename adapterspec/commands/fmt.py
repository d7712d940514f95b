"""`adapterspec fmt [--check] [--diff] FILE...`: rewrite spec files in canonical layout, atomically."""

from __future__ import annotations

import argparse
import difflib
import os
import stat
import sys

from ..errors import EXIT_ERRORS, EXIT_OK, EXIT_USAGE
from ..language.diagnostics import render_text
from ..language.format import format_source
from ..language.parse import decode
from ..outputs import write_file_atomic
from .common import STDIN, Unreadable, display_name, read_input, spec_paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="spec files, directories (searched for *.aspec), or - (standard input to standard output)",
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; print a diff and exit 1 when a file is not formatted"
    )
    parser.add_argument("--diff", action="store_true", help="write nothing; print a diff of what would change")


def unified_diff(before: str, after: str, name: str) -> str:
    lines = difflib.unified_diff(
        before.splitlines(keepends=True), after.splitlines(keepends=True), f"{name} (original)", f"{name} (formatted)"
    )
    out = []
    for line in lines:
        out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(out)


def write_atomically(path: str, text: str) -> None:
    """Replace a file's content in one step, keeping its permissions."""
    write_file_atomic(path, text, mode=stat.S_IMODE(os.stat(path).st_mode))


class _Run:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.write = not (args.check or args.diff)
        self.exit = EXIT_OK
        self.usage_errors: list[str] = []

    def one(self, name: str) -> None:
        filename = display_name(name)
        try:
            data, size = read_input(name)
        except Unreadable as error:
            self.usage_errors.append(str(error))
            return
        text, diagnostics = decode(data, filename, size)
        formatted = None
        if text is not None:
            formatted, diagnostics = format_source(text, filename)
        if formatted is None:
            print(render_text(diagnostics, {filename: text} if text is not None else {}), file=sys.stderr)
            print(f"adapterspec fmt: {filename}: not formatted: fix the syntax errors first", file=sys.stderr)
            self.exit = EXIT_ERRORS
            return
        changed = formatted.encode("utf-8") != data
        if name == STDIN and self.write:
            sys.stdout.write(formatted)
            return
        if changed and not self.write:
            sys.stdout.write(unified_diff(data.decode("utf-8", "replace"), formatted, filename))
            if self.args.check:
                self.exit = EXIT_ERRORS
        elif changed:
            try:
                write_atomically(name, formatted)
            except OSError as error:
                self.usage_errors.append(f"{filename}: cannot write ({error.strerror or error})")
                return
            print(f"reformatted {filename}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    state = _Run(args)
    names, state.usage_errors = spec_paths(args.files)
    for name in names:
        state.one(name)
    for message in state.usage_errors:
        print(f"adapterspec fmt: error: {message}", file=sys.stderr)
    return EXIT_USAGE if state.usage_errors else state.exit
