"""`adapterspec export peft MODEL ADAPTERS -o DIR`: adapters trained with adapterspec as a PEFT LoRA adapter directory."""

from __future__ import annotations

import argparse
import sys

from ..errors import EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", choices=("peft",), help="the format to write")
    parser.add_argument("model", help="the mlx-lm model directory (or cached repo id) the adapters were trained on")
    parser.add_argument("adapters", help="the adapter directory (written by adapterspec or mlx_lm.lora)")
    parser.add_argument("-o", "--output", required=True, help="the PEFT adapter directory to write")
    parser.add_argument("--base-model", help="base_model_name_or_path to record (default: MODEL as given)")
    parser.add_argument(
        "--peft-layout",
        choices=("per-expert", "target-parameters"),
        help="how mixture-of-experts layers are written: one module per expert (transformers 4) or fused parameters "
        "through target_parameters (transformers 5); default: by the transformers_version in the model's config.json",
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")


def run(args) -> int:
    from ..interop.peft import export_peft

    config, findings = export_peft(
        args.model, args.adapters, args.output, base_model=args.base_model, force=args.force, layout=args.peft_layout
    )
    for finding in findings:
        print(f"adapterspec export: {finding.render()}", file=sys.stderr)
    targets = config["target_modules"]
    if not isinstance(targets, str):
        targets = list(targets) + list(config.get("target_parameters") or ())
    shown = targets if isinstance(targets, str) else ", ".join(targets[:6]) + (" …" if len(targets) > 6 else "")
    print(
        f"wrote a PEFT {'DoRA' if config['use_dora'] else 'LoRA'} adapter to {args.output} "
        f"(r={config['r']}, lora_alpha={config['lora_alpha']:g}, target_modules: {shown})",
        file=sys.stderr,
    )
    return EXIT_OK
