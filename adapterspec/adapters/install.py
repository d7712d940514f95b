"""Install a plan into a live MLX model: the layer of each adapter kind, everything built and checked first, then the model changed in one step."""

from __future__ import annotations

from typing import Union

from ..errors import UserError
from ..language.spec import Spec
from ..model.families import unadaptable_reason
from ..model.index import ModuleIndex
from ..model.plan import Plan, plan_spec

ADAPTER_LEAVES = ("lora_a", "lora_b")


def adapter_classes() -> dict[str, type]:
    """The layer class of every adapter kind (`model.kinds.KINDS`)."""
    from .dora import DoRAEmbedding, DoRALinear
    from .embedding import LoRAEmbedding
    from .lora import LoRALinear
    from .switch import LoRASwitchLinear
    from .switch_dora import DoRASwitchLinear
    from .tokens import TokenRows

    classes = (LoRALinear, LoRASwitchLinear, LoRAEmbedding, DoRALinear, DoRAEmbedding, DoRASwitchLinear, TokenRows)
    return {cls.kind: cls for cls in classes}


def from_base(kind: str, base, r: int = 8, scale: float = 20.0, dropout: float = 0.0, freeze_base: bool = True):
    """Wrap `base` in the adapter of `kind`; the base is frozen unless told not to."""
    classes = adapter_classes()
    if kind not in classes:
        raise ValueError(f"unknown adapter kind {kind!r}; expected one of {sorted(classes)}")
    return classes[kind].from_base(base, r=r, scale=scale, dropout=dropout, freeze_base=freeze_base)


def has_adapters(model) -> bool:
    """Whether any module of the model holds adapter parameters (`lora_a` and `lora_b`, or `token_rows`)."""
    stack = [model]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if all(leaf in node for leaf in ADAPTER_LEAVES) or "token_rows" in node:
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
    from .inits import start

    refuse_unadaptable(model, plan)
    return [
        (entry.path, start(entry, module_at(model, entry.path), _maker(entry)))
        for entry in plan.entries
        if entry.adapter != "full"
    ]


def _maker(entry):
    """How to build the entry's adapter on a base (the tokens layer takes its rows, the others a rank)."""
    from ..model.kinds import TOKEN_KINDS

    if entry.adapter in TOKEN_KINDS:
        from .tokens import TokenRows

        return lambda base: TokenRows.from_base(base, rows=entry.rows, freeze_base=False)
    return lambda base: from_base(entry.adapter, base, entry.r, entry.scale, entry.dropout, freeze_base=False)


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

    _ensure_module_state(model)
    model.freeze()
    for entry in plan.entries:
        if entry.adapter == "full":
            module_at(model, entry.path).unfreeze(recurse=False)
    if adapters:
        from .siblings import link

        model.update_modules(tree_unflatten(adapters))
        link(adapters, lambda path: module_at(model, path))


def _ensure_module_state(model) -> None:
    """The state `nn.Module.__init__` sets, on a root whose class skipped it (recurrent_gemma's Model):
    without it mlx's `freeze` fails with "'Model' object has no attribute '_no_grad'"."""
    for name, value in (("_no_grad", set()), ("_training", True)):
        if name not in vars(model):
            object.__setattr__(model, name, value)


def refuse_unadaptable(model, plan: Plan) -> None:
    """UserError naming the planned modules whose class cannot take an adapter, and why (once per class)."""
    by_class: dict[str, list[str]] = {}
    for entry in plan.entries:
        if entry.adapter != "full":
            cls = type(module_at(model, entry.path)).__name__
            if unadaptable_reason(cls):
                by_class.setdefault(cls, []).append(entry.path)
    if by_class:
        parts = []
        for cls, paths in by_class.items():
            named = ", ".join(f"'{p}'" for p in paths[:3]) + (f" (+{len(paths) - 3} more)" if len(paths) > 3 else "")
            parts.append(f"{named} ({cls}): {unadaptable_reason(cls)}")
        raise UserError(
            "cannot put adapters on " + "; ".join(parts),
            help="leave these modules out of the spec, e.g. with a rule '**.qkv_proj: none'",
        )


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
