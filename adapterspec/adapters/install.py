"""Apply a spec to a live MLX model: plan and check everything first, then change the model in one step."""

from __future__ import annotations

from typing import Union

from ..language.spec import Spec
from ..model.index import ModuleIndex
from ..model.plan import Plan, plan_spec

ADAPTER_LEAVES = ("lora_a", "lora_b")


def has_adapters(model) -> bool:
    """Whether any module of the model holds adapter parameters (`lora_a` and `lora_b`)."""
    stack = [model]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if all(leaf in node for leaf in ADAPTER_LEAVES):
                return True
            stack.extend(v for v in node.values() if isinstance(v, (dict, list, tuple)))
        else:
            stack.extend(v for v in node if isinstance(v, (dict, list, tuple)))
    return False


def module_at(model, path: str):
    """The module at a dotted path (`model.layers.3.mlp`), reached by indexing, not by listing every module."""
    node = model
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, (list, tuple)) else node[part]
    return node


def plan_for_model(model, spec: Union[Spec, str]) -> Plan:
    """The plan of a spec on a live model, raising SpecError (with every diagnostic) when it has errors."""
    return plan_spec(spec, ModuleIndex.from_module(model))


def build_adapters(model, plan: Plan) -> list[tuple[str, object]]:
    """Every adapter module the plan asks for, built beside the model (the model is not changed:
    the bases are left unfrozen here, `install` freezes the whole base in one pass)."""
    from . import from_base

    return [
        (entry.path, from_base(entry.adapter, module_at(model, entry.path), entry.r, entry.scale, entry.dropout,
                               freeze_base=False))
        for entry in plan.entries
        if entry.adapter != "full"
    ]


def trainable_shapes(model, plan: Plan, adapters: list[tuple[str, object]]) -> dict[str, tuple]:
    """Path → shape of every parameter that is trainable once the plan is installed."""
    from mlx.utils import tree_flatten

    shapes = {}
    for path, adapter in adapters:
        for name, value in tree_flatten(adapter.trainable_parameters()):
            if not name.startswith(("linear.", "embedding.")):
                shapes[f"{path}.{name}"] = tuple(value.shape)
    for entry in plan.entries:
        if entry.adapter == "full":
            module = module_at(model, entry.path)
            for name, value in module.parameters().items():
                if hasattr(value, "shape"):
                    shapes[f"{entry.path}.{name}"] = tuple(value.shape)
    return shapes


def install(model, plan: Plan, adapters: list[tuple[str, object]]) -> None:
    """Freeze the base, unfreeze the plan's `full` modules, put the adapters in place (one update)."""
    from mlx.utils import tree_unflatten

    model.freeze()
    for entry in plan.entries:
        if entry.adapter == "full":
            module_at(model, entry.path).unfreeze(recurse=False)
    if adapters:
        model.update_modules(tree_unflatten(adapters))


def apply(model, spec: Union[Spec, str, Plan]) -> Plan:
    """Freeze the base, install the adapters the spec asks for, and unfreeze its `full` modules.

    Nothing is changed when the spec has errors on this model (SpecError) or when building an
    adapter fails: every adapter is built before the model is touched.
    """
    if has_adapters(model):
        raise ValueError("the model already has adapters; apply a spec to a model without adapters")
    plan = spec if isinstance(spec, Plan) else plan_for_model(model, spec)
    install(model, plan, build_adapters(model, plan))
    return plan
