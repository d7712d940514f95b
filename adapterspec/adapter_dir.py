"""Adapter directories: `adapters.safetensors` + `adapter_config.json`, written atomically, read back
into a model — ours (spec and plan inside) or mlx-lm's (`keys`/`num_layers` translated to a spec)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from . import __version__
from .diagnostics import SpecError
from .errors import UserError
from .modules import ModuleIndex

if TYPE_CHECKING:
    from .plan import Plan

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
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


def adapter_weights(model) -> dict:
    """The trainable parameters of an adapted model by full path (what mlx-lm saves too)."""
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.trainable_parameters()))


def save_adapters(model, plan: Plan, dest, *, force: bool = False, protect=(), extra_config: Optional[dict] = None) -> Path:
    """Write the model's adapter weights and config into `dest`, atomically."""
    import mlx.core as mx

    from .io import atomic_output_dir

    weights = adapter_weights(model)
    config = adapter_config(plan, extra_config)
    with atomic_output_dir(dest, force=force, protect=protect) as tmp:
        mx.save_safetensors(str(tmp / ADAPTER_WEIGHTS), weights, metadata={"format": "mlx"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Path(dest)


def read_adapter_config(path) -> dict:
    config_path = Path(path) / ADAPTER_CONFIG
    if not config_path.is_file():
        raise UserError(f"{path} is not an adapter directory: {ADAPTER_CONFIG} is missing",
                        help="pass the directory written by 'adapterspec apply -o DIR' or by mlx_lm.lora")
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
        raise UserError("this adapter directory holds a full fine-tune (fine_tune_type: full), not adapters",
                        help="load its weights with mlx-lm directly")
    parameters = config.get("lora_parameters")
    if parameters is None or "num_layers" not in config:
        raise UserError(f"{ADAPTER_CONFIG} has neither an 'adapterspec' section nor mlx-lm's lora_parameters/num_layers")
    text, notes = spec_from_mlx_lm(parameters, int(config["num_layers"]), fine_tune_type, index)
    return text, "<mlx-lm adapter_config.json>", notes


def load_adapters(model, path, *, strict: bool = True) -> Plan:
    """Install the adapters an adapter directory describes into `model` and load their weights."""
    import mlx.core as mx

    from .apply import build_adapters, has_adapters, install, trainable_shapes
    from .lint import parse_spec
    from .plan import make_plan

    path = Path(path)
    config = read_adapter_config(path)
    index = ModuleIndex.from_module(model)
    text, filename, _notes = spec_text_of(config, index)
    spec = parse_spec(text, filename)
    plan = make_plan(spec, index)
    if not plan.ok:
        raise SpecError(plan.diagnostics, text)
    saved = config.get("adapterspec", {}).get("plan")
    if saved is not None:
        expected = [(m["path"], m["adapter"], m["r"]) for m in saved["modules"]]
        actual = [(e.path, e.adapter, e.r) for e in plan.entries]
        if expected != actual:
            raise UserError(f"{path} was made for another model: its plan does not match this model's modules",
                            help="load the adapters onto the model they were trained for")
    weights_path = path / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise UserError(f"{path}: {ADAPTER_WEIGHTS} is missing")
    try:
        weights = mx.load(str(weights_path))
    except (RuntimeError, ValueError) as error:
        raise UserError(f"{weights_path}: not a readable safetensors file ({error})") from error
    if has_adapters(model):
        raise UserError("the model already has adapters", help="load adapters onto a freshly loaded model")
    adapters = build_adapters(model, plan)
    expected = trainable_shapes(model, plan, adapters)
    problems = []
    for name, value in weights.items():
        if name not in expected:
            problems.append(f"'{name}' is not an adapter parameter of the model")
        elif tuple(value.shape) != expected[name]:
            problems.append(f"'{name}' has shape {tuple(value.shape)}, the model expects {expected[name]}")
    missing = sorted(set(expected) - set(weights))
    if strict and missing:
        problems.append(f"{len(missing)} adapter parameter(s) are missing from the file, e.g. '{missing[0]}'")
    if problems:
        raise UserError(f"{weights_path} does not fit the adapters: " + "; ".join(problems[:3]))
    install(model, plan, adapters)
    model.load_weights(list(weights.items()), strict=False)
    return plan
