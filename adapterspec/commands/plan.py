"""`adapterspec plan MODEL SPEC`: per rule what it matched and adapts, totals, and mlx-lm compatibility."""

from __future__ import annotations

import argparse
import json

from ..errors import EXIT_ERRORS, EXIT_OK
from ..tables import format_table
from .common import model_index, print_diagnostics, spec_or_exit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a local mlx-lm model directory (or a repo id in the local cache)")
    parser.add_argument("spec", help="the spec file (.aspec)")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every adapted module")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--strict", action="store_true", help="fail (exit 1) on warnings too")


def is_parameter_free_leaf(info) -> bool:
    """RoPE, activations: listed by a live model, absent from a model directory's headers, never adapted."""
    return info.family == "leaf" and info.num_params == 0


def rule_rows(plan) -> list[list[object]]:
    rows = []
    for outcome in plan.outcomes:
        rule = outcome.rule
        entries = [e for e in plan.entries if e.rule_index == rule.index]
        kinds = sorted({e.adapter for e in entries}) or ([rule.transform.kind] if outcome.decided else ["—"])
        rows.append([
            rule.span.line,
            rule.text,
            sum(1 for path in outcome.matched if not is_parameter_free_leaf(plan.index[path])),
            len(outcome.decided),
            ", ".join(kinds),
            rule.transform.describe(),
            f"{sum(e.trainable for e in entries):,}",
        ])
    return rows


def module_rows(plan) -> list[list[object]]:
    return [
        [e.path, e.base, e.adapter, e.r if e.r is not None else "", f"{e.scale:g}" if e.scale is not None else "",
         f"{e.dropout:g}" if e.dropout is not None else "", f"{e.trainable:,}", e.rule_span.line]
        for e in plan.entries
    ]


def render(plan, verbose: bool) -> str:
    from ..model.mlxlm import mlx_lm_config

    out = [format_table(["line", "rule", "matched", "decides", "adapter", "transform", "trainable"],
                        rule_rows(plan), right=(0, 2, 3, 6))]
    if verbose:
        out += ["", format_table(["module", "base", "adapter", "r", "scale", "dropout", "trainable", "rule"],
                                 module_rows(plan), right=(3, 4, 5, 6, 7))]
    total, trainable = plan.total_parameters, plan.trainable_parameters
    share = 100.0 * trainable / total if total else 0.0
    out += ["", f"{len(plan.entries)} modules adapted; trainable parameters: {trainable:,} of {total:,} ({share:.3f}%)"]
    fit = mlx_lm_config(plan, plan.index)
    if fit.compatible:
        params = fit.config["lora_parameters"]
        out.append(f"mlx-lm compatible: yes (fine_tune_type={fit.config['fine_tune_type']}, "
                   f"num_layers={fit.config['num_layers']}, rank={params['rank']}, keys={len(params['keys'])})")
    else:
        out.append("mlx-lm compatible: no — " + "; ".join(fit.reasons))
        out.append("  (adapterspec.load_adapters and 'adapterspec fuse' still read these adapters)")
    return "\n".join(out)


def run(args) -> int:
    from ..model.plan import make_plan

    spec, diagnostics, text, code = spec_or_exit(args.spec)
    if spec is None:
        return code
    plan = make_plan(spec, model_index(args.model))
    all_diagnostics = list(diagnostics) + plan.diagnostics
    failed = any(d.is_error for d in all_diagnostics) or (args.strict and any(d.severity.value == "warning" for d in all_diagnostics))
    if args.json:
        payload = plan.to_json()
        payload["diagnostics"] = [d.to_json() for d in all_diagnostics]
        print(json.dumps(payload, indent=2))
    else:
        print_diagnostics(all_diagnostics, text, args.spec)
        if plan.ok:
            print(render(plan, args.verbose))
    return EXIT_ERRORS if failed else EXIT_OK
