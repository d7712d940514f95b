"""The adapter-directory format: `adapters.safetensors` + `adapter_config.json`, ours (spec and plan inside) or
mlx-lm's (`keys`/`num_layers`, translated to a spec); reading and writing the weights is `adapters.weights`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .. import __version__
from ..errors import UserError
from .index import ModuleIndex

if TYPE_CHECKING:
    from .plan import Plan

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# What an adapter directory holds: with --force, a directory holding only these is a previous output to replace.
ADAPTER_DIR_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)
FORMAT = 1


def adapter_config(plan: Plan, extra: Optional[dict] = None) -> dict:
    """The adapter_config.json of a plan: our section, plus mlx-lm's keys when the plan fits them."""
    from .mlxlm import mlx_lm_config

    fit = mlx_lm_config(plan, plan.index)
    plan_json = plan.to_json()
    plan_json.pop("diagnostics", None)
    ours = {
        "format": FORMAT,
        "version": __version__,
        "spec": plan.spec.source,
        "spec_file": Path(plan.spec.filename).name,
        "plan": plan_json,
        "mlx_lm_compatible": fit.compatible,
    }
    if not fit.compatible:
        ours["mlx_lm_incompatible_because"] = fit.reasons
    config: dict = {"adapterspec": ours}
    if fit.compatible:
        config.update(fit.config)
    if extra:
        config.update(extra)
    return config


def read_adapter_config(path) -> dict:
    config_path = Path(path) / ADAPTER_CONFIG
    if not config_path.is_file():
        raise UserError(
            f"{path} is not an adapter directory: {ADAPTER_CONFIG} is missing",
            help="pass the directory written by 'adapterspec apply -o DIR' or by mlx_lm.lora",
        )
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{config_path}: not valid JSON ({error})") from error


def spec_text_of(config: dict, index: ModuleIndex) -> tuple[str, str, list[str]]:
    """The spec text an adapter config stands for, its file name, and notes on the translation."""
    from .mlxlm import spec_from_mlx_lm

    ours = config.get("adapterspec")
    if ours is not None:
        return ours["spec"], ours.get("spec_file", "<adapter_config.json>"), []
    fine_tune_type = config.get("fine_tune_type", "lora")
    if fine_tune_type == "full":
        raise UserError(
            "this adapter directory holds a full fine-tune (fine_tune_type: full), not adapters",
            help="load its weights with mlx-lm directly",
        )
    parameters = config.get("lora_parameters")
    if parameters is None or "num_layers" not in config:
        raise UserError(
            f"{ADAPTER_CONFIG} has neither an 'adapterspec' section nor mlx-lm's lora_parameters/num_layers"
        )
    text, notes = spec_from_mlx_lm(parameters, int(config["num_layers"]), fine_tune_type, index)
    return text, "<mlx-lm adapter_config.json>", notes
