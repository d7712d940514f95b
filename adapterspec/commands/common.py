"""Pieces the subcommands share: reading spec files (paths, standard input) with diagnostics, indexing a model."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from ..errors import EXIT_ERRORS, UserError
from ..inputs import open_regular
from ..language.diagnostics import Diagnostic, render_text
from ..language.parse import MAX_FILE_BYTES

if TYPE_CHECKING:
    from ..language.spec import Spec

STDIN = "-"
SPEC_SUFFIX = ".aspec"


def seed(text: str) -> int:
    """An argparse type: a seed for mlx's and numpy's generators (0 … 2**32 - 1)."""
    from ..train.options import SEED_MAX

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{value} is outside 0 … {SEED_MAX}")
    return value


class Unreadable(Exception):
    """A named input that cannot be read; its message is ready for the user."""


def read_input(name: str) -> tuple[bytes, int]:
    """The bytes of a file (or stdin), at most one byte past the size limit, and the full size when known."""
    if name == STDIN:
        data = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
        return data, len(data)
    try:
        with open_regular(name) as file:
            size = os.fstat(file.fileno()).st_size
            data = file.read(MAX_FILE_BYTES + 1)
            return data, max(size, len(data))
    except UserError as error:
        raise Unreadable(error.message) from None
    except OSError as error:
        raise Unreadable(f"{name}: cannot read ({error.strerror or error})") from None


def read_spec(path: str) -> tuple[Optional["Spec"], list[Diagnostic], Optional[str]]:
    """A spec file's Spec (None on errors), its diagnostics and its text; unreadable files are UserErrors."""
    from ..language.lint import check_bytes

    try:
        data, _size = read_input(path)
    except Unreadable as error:
        raise UserError(str(error)) from None
    return check_bytes(data, path)


def print_diagnostics(diagnostics: Sequence[Diagnostic], source: Optional[str], filename: str, stream=None) -> None:
    if diagnostics:
        stream = stream or sys.stderr
        print(render_text(diagnostics, {filename: source} if source is not None else {}), file=stream)


def check_argument_order(model: str, spec: str, command: str) -> None:
    """A clear error when MODEL and SPEC were given the other way round."""
    if Path(spec).is_dir() and Path(model).is_file():
        raise UserError(
            f"{spec} is a directory and {model} a file: the arguments are MODEL SPEC",
            help=f"adapterspec {command} {spec} {model}",
        )


def spec_or_exit(path: str) -> tuple[Optional["Spec"], list[Diagnostic], Optional[str], int]:
    """Read a spec; when it has errors print them and return the exit code 1 with no Spec."""
    spec, diagnostics, text = read_spec(path)
    if spec is None:
        print_diagnostics(diagnostics, text, path)
        return None, diagnostics, text, EXIT_ERRORS
    return spec, diagnostics, text, 0


def model_index(model: str):
    """The ModuleIndex of a model directory (or locally cached repo id), read without mlx."""
    from ..model.files import resolve_model_path
    from ..model.index import ModuleIndex

    return ModuleIndex.from_model_dir(resolve_model_path(model))


def describe_shape(info) -> str:
    if info.family == "switch":
        text = f"{info.num_experts}×({info.input_dims}→{info.output_dims})"
    elif info.family == "embedding":
        text = f"{info.input_dims}×{info.output_dims}"
    elif info.family == "linear":
        text = f"{info.input_dims}→{info.output_dims}"
    else:
        text = ""
    if info.bits is not None:
        mode = "" if info.mode in (None, "affine") else f" {info.mode}"
        text += f" q{info.bits}/g{info.group_size}{mode}"
    return text


def spec_paths(names: list[str]) -> tuple[list[str], list[str]]:
    """The inputs in the order given, each directory replaced by the spec files beneath it (sorted),
    and a message for each directory that holds none."""
    paths: list[str] = []
    problems: list[str] = []
    for name in names:
        if name != STDIN and os.path.isdir(name):
            found = sorted(str(p) for p in Path(name).rglob(f"*{SPEC_SUFFIX}") if p.is_file())
            paths += found
            if not found:
                problems.append(f"{name}: no *{SPEC_SUFFIX} files there")
        else:
            paths.append(name)
    return paths, problems


def display_name(name: str) -> str:
    return "<stdin>" if name == STDIN else name
