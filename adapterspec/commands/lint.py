"""`adapterspec lint FILE...`: every diagnostic of every file (with --model, of its plan too); never imports mlx."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from ..errors import EXIT_ERRORS, EXIT_OK, EXIT_USAGE
from ..language.diagnostics import (
    Diagnostic,
    Severity,
    render_github,
    render_json,
    render_text,
    sort_key,
)
from ..language.lint import diagnose_bytes
from .common import SPEC_SUFFIX, Unreadable, display_name, read_input, spec_paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help=f"spec files, directories (searched for *{SPEC_SUFFIX}), or - for standard input",
    )
    parser.add_argument("--strict", action="store_true", help="fail (exit 1) on warnings too")
    parser.add_argument(
        "--format",
        choices=("text", "json", "github"),
        default="text",
        help="text (default), json (one object per line) or github (workflow annotations)",
    )
    parser.add_argument(
        "--model", metavar="DIR", help="also match every spec against this model directory (read without MLX)"
    )


def plan_diagnostics(checked, index) -> list[Diagnostic]:
    """The plan's diagnostics (model-dependent: they never repeat the static checks')."""
    from ..language.spec import spec_from_checked
    from ..model.plan import make_plan

    return make_plan(spec_from_checked(checked), index).diagnostics


def summary(diagnostics: list[Diagnostic], files: int) -> str:
    errors = sum(d.severity is Severity.ERROR for d in diagnostics)
    warnings = sum(d.severity is Severity.WARNING for d in diagnostics)
    with_problems = len({d.filename for d in diagnostics})
    return (
        f"{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)} "
        f"in {with_problems} file{'s' * (with_problems != 1)} ({files} checked)"
    )


def fails(diagnostics: list[Diagnostic], strict: bool) -> bool:
    failing = {Severity.ERROR, Severity.WARNING} if strict else {Severity.ERROR}
    return any(d.severity in failing for d in diagnostics)


def run(args: argparse.Namespace) -> int:
    index = None
    if args.model:
        from ..model.index import ModuleIndex

        index = ModuleIndex.from_model_dir(args.model)
    every: list[Diagnostic] = []
    blocks: list[str] = []
    names, unreadable = spec_paths(args.files)
    for name in names:
        filename = display_name(name)
        try:
            data, size = read_input(name)
        except Unreadable as error:
            unreadable.append(str(error))
            continue
        checked, diagnostics, text = diagnose_bytes(data, filename, size)
        if index is not None and checked is not None:
            diagnostics = sorted(diagnostics + plan_diagnostics(checked, index), key=sort_key)
        every += diagnostics
        if diagnostics:
            blocks.append(render(diagnostics, args.format, filename, text))
    if blocks:
        print("\n\n".join(blocks) if args.format == "text" else "\n".join(blocks))
    if every and args.format == "text":
        print(f"\n{summary(every, len(names))}")
    for message in unreadable:
        print(f"adapterspec lint: error: {message}", file=sys.stderr)
    if unreadable:
        return EXIT_USAGE
    return EXIT_ERRORS if fails(every, args.strict) else EXIT_OK


def render(diagnostics: list[Diagnostic], style: str, filename: str, text: Optional[str]) -> str:
    if style == "json":
        return render_json(diagnostics)
    if style == "github":
        return render_github(diagnostics)
    return render_text(diagnostics, {filename: text} if text is not None else {})
