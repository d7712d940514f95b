"""Adapter weights in a live model: saved with its adapter directory, and loaded back (ours or mlx-lm's)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..errors import UserError
from ..model.adapter_format import (
    ADAPTER_CONFIG,
    ADAPTER_DIR_FILES,
    ADAPTER_WEIGHTS,
    adapter_config,
    check_weights_file,
    plan_of,
    read_adapter_config,
)
from ..model.index import ModuleIndex

if TYPE_CHECKING:
    from ..model.plan import Plan  # the spec language: a fuse loads these weights while a thread imports it

UNREADABLE_HELP = "the file is damaged or incomplete: copy or write it again"


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

    weights = saved_weights(model, adapter_weights(model))
    config = adapter_config(plan, extra_config)
    with atomic_output_dir(dest, force=force, protect=protect, produces=ADAPTER_DIR_FILES) as tmp:
        mx.save_safetensors(str(tmp / ADAPTER_WEIGHTS), weights, metadata={"format": "mlx"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Path(dest)


def saved_weights(model, weights: dict) -> dict:
    """The weights to save: an adapter that started from PiSSA / OLoRA factors is written as [A, A0] and [B, −B0],
    rank 2r, so that original W + scale·(A·B − A0·B0)ᵀ is the trained layer, as mlx-lm and PEFT read it."""
    import mlx.core as mx

    from .inits import INITIAL
    from .install import module_at

    saved = dict(weights)
    for name in weights:
        if not name.endswith(".lora_a"):
            continue
        path = name[: -len(".lora_a")]
        initial = getattr(module_at(model, path), INITIAL, None)
        if initial is not None:
            a0, b0 = initial
            saved[f"{path}.lora_a"] = mx.concatenate([weights[f"{path}.lora_a"], a0], axis=1)
            saved[f"{path}.lora_b"] = mx.concatenate([weights[f"{path}.lora_b"], -b0], axis=0)
    return saved


def load_adapters(model, path, *, strict: bool = True) -> Plan:
    """Install the adapters an adapter directory describes into `model` and load their weights.

    The model is left in eval mode (dropout off), as `mlx_lm.load(..., adapter_path=...)` leaves it;
    call `model.train()` to train on."""
    path = Path(path)
    config = read_adapter_config(path)
    plan, _notes = plan_of(config, ModuleIndex.from_module(model), path)
    install_weights(model, plan, check_weights_file(path / ADAPTER_WEIGHTS), strict=strict)
    model.eval()
    return plan


def read_weights(file) -> dict:
    """The tensors of a user's safetensors file (adapters), each finite; a UserError names the file and tensor."""
    import mlx.core as mx

    try:
        weights = mx.load(str(file))
    except (RuntimeError, ValueError, OSError) as error:
        raise UserError(f"{file}: not a readable safetensors file ({error})", help=UNREADABLE_HELP) from None
    if not isinstance(weights, dict):
        raise UserError(f"{file}: not a safetensors file", help=UNREADABLE_HELP)
    check_finite(weights, file)
    return weights


def check_finite(weights: dict, file) -> None:
    """Refuse tensors holding NaN or Inf (a diverged training run): merged or loaded, they would spoil every output."""
    import mlx.core as mx

    for name in sorted(weights):
        value = weights[name]
        if not mx.issubdtype(value.dtype, mx.floating) or value.size == 0:
            continue
        if not mx.all(mx.isfinite(value)).item():
            raise UserError(
                f"{file}: tensor '{name}' holds NaN or infinite values",
                help="the adapters are broken (a diverged training run?): train them again or use an earlier checkpoint",
            )


def install_weights(model, plan: Plan, weights_path: Path, *, strict: bool = True) -> None:
    """Install the plan's adapters into `model` with the weights of a safetensors file; nothing changes on a misfit."""
    import mlx.core as mx

    from .install import build_adapters, has_adapters, install, trainable_shapes

    weights = read_weights(weights_path)
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
        elif not mx.issubdtype(value.dtype, mx.floating):
            problems.append(f"'{name}' is {value.dtype}, not a floating-point tensor")
    missing = sorted(set(expected) - set(weights))
    if strict and missing:
        problems.append(f"{len(missing)} adapter parameter(s) are missing from the file, e.g. '{missing[0]}'")
    if problems:
        raise UserError(f"{weights_path} does not fit the adapters: " + "; ".join(problems[:3]))
    install(model, plan, adapters)
    model.load_weights(list(weights.items()), strict=False)
