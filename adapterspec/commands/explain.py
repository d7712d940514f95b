"""`adapterspec explain SPEC MODEL [MODULE]`: per module, the rule that decides it, the rules it overrides, and why others do not apply."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import EXIT_OK, UserError
from .common import model_index, print_diagnostics, spec_or_exit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="the spec file (.aspec)")
    parser.add_argument("model", help="a local mlx-lm model directory (or a repo id in the local cache)")
    parser.add_argument(
        "module", nargs="?", help="only this module path, or the modules a selector matches and all beneath them"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also list near misses of modules that a rule decides"
    )
    parser.add_argument("--json", action="store_true", help="print the explanations as JSON")


def explanations_json(explanations, diagnostics) -> str:
    return json.dumps(
        {"modules": [e.to_json() for e in explanations], "diagnostics": [d.to_json() for d in diagnostics]}, indent=2
    )


def run(args) -> int:
    from ..model.explain import explain, render, selected_paths
    from ..model.plan import make_plan

    if Path(args.spec).is_dir() and Path(args.model).is_file():
        raise UserError(
            "the spec comes first: adapterspec explain SPEC MODEL", help=f"adapterspec explain {args.model} {args.spec}"
        )
    spec, diagnostics, text, code = spec_or_exit(args.spec)
    if spec is None:
        if args.json:
            print(explanations_json([], diagnostics))
        return code
    index = model_index(args.model)
    plan = make_plan(spec, index)
    paths = selected_paths(args.module, index) if args.module else None
    explanations = explain(plan, index, paths)
    if args.json:
        print(explanations_json(explanations, plan.diagnostics))
        return EXIT_OK
    print_diagnostics(plan.diagnostics, text, args.spec)
    print(render(explanations, verbose=args.verbose))
    return EXIT_OK
