"""Adapter weights in a live model: saved with its adapter directory, and loaded back (ours or mlx-lm's)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..model.adapter_format import (
    ADAPTER_CONFIG,
    ADAPTER_DIR_FILES,
    ADAPTER_WEIGHTS,
    adapter_config,
    read_adapter_config,
    spec_text_of,
)
from ..model.index import ModuleIndex
from ..model.plan import Plan


def adapter_weights(model) -> dict:
    """The trainable parameters of an adapted model by full path (what mlx-lm saves too)."""
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.trainable_parameters()))


def save_adapters(
    model, plan: Plan, dest, *, force: bool = False, protect=(), extra_config: Optional[dict] = None
) -> Path:
    """Write the model's adapter weights and config into `dest`, atomically."""
    import mlx.core as mx

    from ..outputs import atomic_output_dir

    weights = adapter_weights(model)
    config = adapter_config(plan, extra_config)
    with atomic_output_dir(dest, force=force, protect=protect, produces=ADAPTER_DIR_FILES) as tmp:
        mx.save_safetensors(str(tmp / ADAPTER_WEIGHTS), weights, metadata={"format": "mlx"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Path(dest)


def load_adapters(model, path, *, strict: bool = True) -> Plan:
    """Install the adapters an adapter directory describes into `model` and load their weights.

    The model is left in eval mode (dropout off), as `mlx_lm.load(..., adapter_path=...)` leaves it;
    call `model.train()` to train on."""
    from ..model.plan import plan_spec

    path = Path(path)
    config = read_adapter_config(path)
    index = ModuleIndex.from_module(model)
    text, filename, _notes = spec_text_of(config, index)
    plan = plan_spec(text, index, filename)
    saved = config.get("adapterspec", {}).get("plan")
    if saved is not None:
        expected = [(m["path"], m["adapter"], m["r"]) for m in saved["modules"]]
        actual = [(e.path, e.adapter, e.r) for e in plan.entries]
        if expected != actual:
            raise UserError(
                f"{path} was made for another model: its plan does not match this model's modules",
                help="load the adapters onto the model they were trained for",
            )
    weights_path = path / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise UserError(f"{path}: {ADAPTER_WEIGHTS} is missing")
    install_weights(model, plan, weights_path, strict=strict)
    model.eval()
    return plan


def install_weights(model, plan: Plan, weights_path: Path, *, strict: bool = True) -> None:
    """Install the plan's adapters into `model` with the weights of a safetensors file; nothing changes on a misfit."""
    import mlx.core as mx

    from .install import build_adapters, has_adapters, install, trainable_shapes

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
