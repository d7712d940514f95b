"""What several subcommands print alike: a plan as tables (`plan`, `apply`) and what a finished fuse did (`fuse`, `apply --fuse`)."""

from __future__ import annotations

import sys

from ..tables import format_table


def is_parameter_free_leaf(info) -> bool:
    """RoPE, activations: listed by a live model, absent from a model directory's headers, never adapted."""
    return info.family == "leaf" and info.num_params == 0


def rule_rows(plan) -> list[list[object]]:
    rows = []
    for outcome in plan.outcomes:
        rule = outcome.rule
        entries = [e for e in plan.entries if e.rule_index == rule.index]
        kinds = sorted({e.adapter for e in entries}) or ([rule.transform.kind] if outcome.decided else ["—"])
        rows.append(
            [
                rule.span.line,
                rule.text,
                sum(1 for path in outcome.matched if not is_parameter_free_leaf(plan.index[path])),
                len(outcome.decided),
                ", ".join(kinds),
                rule.transform.describe(),
                f"{sum(e.trainable for e in entries):,}",
            ]
        )
    return rows


def module_rows(plan) -> list[list[object]]:
    return [
        [
            e.path,
            e.base,
            e.adapter,
            e.r if e.r is not None else "",
            f"{e.scale:g}" if e.scale is not None else "",
            f"{e.dropout:g}" if e.dropout is not None else "",
            f"{e.trainable:,}",
            e.rule_span.line,
        ]
        for e in plan.entries
    ]


def render(plan, verbose: bool) -> str:
    from ..model.adapter_format import saved_plan
    from ..model.mlxlm import mlx_lm_config
    from ..model.vlm import is_vlm_index, mlx_vlm_config

    out = [
        format_table(
            ["line", "rule", "matched", "decides", "adapter", "transform", "trainable"],
            rule_rows(plan),
            right=(0, 2, 3, 6),
        )
    ]
    if verbose:
        out += [
            "",
            format_table(
                ["module", "base", "adapter", "r", "scale", "dropout", "trainable", "rule"],
                module_rows(plan),
                right=(3, 4, 5, 6, 7),
            ),
        ]
    total, trainable = plan.total_parameters, plan.trainable_parameters
    share = 100.0 * trainable / total if total else 0.0
    out += ["", f"{len(plan.entries)} modules adapted; trainable parameters: {trainable:,} of {total:,} ({share:.3f}%)"]
    saved = saved_plan(plan)  # what the adapter directory holds (PiSSA / OLoRA: rank 2r on the original weights)
    fit = mlx_lm_config(saved, plan.index)
    if saved is not plan:
        out.append("pissa/olora adapters are saved as plain LoRA of twice their rank on the original weights")
    if fit.compatible:
        params = fit.config["lora_parameters"]
        out.append(
            f"mlx-lm compatible: yes (fine_tune_type={fit.config['fine_tune_type']}, "
            f"num_layers={fit.config['num_layers']}, rank={params['rank']}, keys={len(params['keys'])})"
        )
    elif is_vlm_index(plan.index):
        vlm_fit = mlx_vlm_config(plan)
        if vlm_fit.compatible:
            params = vlm_fit.config["lora_parameters"]
            out.append(
                f"mlx-vlm compatible: yes (fine_tune_type={vlm_fit.config['fine_tune_type']}, "
                f"rank={params['rank']}, keys={len(params['keys'])})"
            )
        else:
            out.append("mlx-vlm compatible: no — " + "; ".join(vlm_fit.reasons))
            out.append("  (adapterspec.load_adapters and 'adapterspec fuse' still read these adapters)")
    else:
        out.append("mlx-lm compatible: no — " + "; ".join(fit.reasons))
        out.append("  (adapterspec.load_adapters and 'adapterspec fuse' still read these adapters)")
    return "\n".join(out)


def print_outcome(result, output: str) -> None:
    """What a finished fuse did: notes, lost adapters with what to do, and the files written (stderr)."""
    for note in result.plan.notes:
        print(f"note: {note}", file=sys.stderr)
    for path in result.removed_stale:
        print(f"removed {path}, left by an interrupted fuse", file=sys.stderr)
    lost = result.report.lost
    if lost:
        print(
            f"warning: {len(lost)} module(s) keep less than half of their adapter, e.g. '{lost[0].path}' as {lost[0].stored}",
            file=sys.stderr,
        )
        if any(m.requantized for m in lost):
            print(
                "  help: --keep-precision auto stores them unquantized; --strict makes this an error", file=sys.stderr
            )
        else:
            print(
                "  help: their change is below the precision of the weights' dtype; check the adapter's scale",
                file=sys.stderr,
            )
    if result.kept_dense:
        print(f"kept {len(result.kept_dense)} module(s) unquantized so that their adapter survives", file=sys.stderr)
    shards = len(result.shards)
    replaced = sum(1 for m in result.plan.adapters.modules if m.kind == "full")
    what = f"{len(result.plan.fused_units)} adapter(s)" + (
        f" and {replaced} fully trained module(s)" if replaced else ""
    )
    print(
        f"fused {what} into {output}: {shards} weight file{'s' * (shards != 1)}, "
        f"{result.bytes_written / 1e9:.2f} GB in {result.seconds:.1f} s",
        file=sys.stderr,
    )
