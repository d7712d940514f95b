"""`adapterspec plan MODEL SPEC`: per rule what it matched and adapts, totals, and mlx-lm compatibility."""

from __future__ import annotations

import argparse
import json

from ..errors import EXIT_ERRORS, EXIT_OK
from .common import check_argument_order, model_index, print_diagnostics, spec_or_exit
from .reports import render


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a local mlx-lm model directory (or a repo id in the local cache)")
    parser.add_argument("spec", help="the spec file (.aspec)")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every adapted module")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--strict", action="store_true", help="fail (exit 1) on warnings too")


def no_plan_json(diagnostics) -> dict:
    """The JSON of a plan that a spec with errors cannot have: no modules, and the model left unread."""
    return {
        "modules": [],
        "trainable_parameters": 0,
        "total_parameters": None,
        "diagnostics": [d.to_json() for d in diagnostics],
    }


def run(args) -> int:
    from ..model.plan import make_plan

    check_argument_order(args.model, args.spec, "plan")
    spec, diagnostics, text, code = spec_or_exit(args.spec)
    if spec is None:
        if args.json:
            print(json.dumps(no_plan_json(diagnostics), indent=2))
        return code
    plan = make_plan(spec, model_index(args.model))
    all_diagnostics = list(diagnostics) + plan.diagnostics
    failed = any(d.is_error for d in all_diagnostics) or (
        args.strict and any(d.severity.value == "warning" for d in all_diagnostics)
    )
    if args.json:
        payload = plan.to_json()
        payload["diagnostics"] = [d.to_json() for d in all_diagnostics]
        print(json.dumps(payload, indent=2))
    else:
        print_diagnostics(all_diagnostics, text, args.spec)
        if plan.ok:
            print(render(plan, args.verbose))
    return EXIT_ERRORS if failed else EXIT_OK
