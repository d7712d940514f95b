"""Per-rule optimizer groups: each trainable parameter's learning-rate scale (the rule's `lr_scale`, times
`loraplus` for LoRA's B) and weight decay, trained by one mlx optimizer per group inside `MultiOptimizer`."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Union

from ..errors import UserError

# LoRA+ speeds up the factor that starts at zero and maps the rank up to the output (B); A (and DoRA's m) keep the rate.
LORAPLUS_LEAVES = ("lora_b",)


@dataclass(frozen=True)
class Group:
    """Parameters that train alike: the learning rate is the run's times `lr_scale`; `weight_decay` None = the run's."""

    lr_scale: float = 1.0
    weight_decay: Optional[float] = None

    def describe(self) -> str:
        decay = "" if self.weight_decay is None else f", weight_decay {self.weight_decay:g}"
        return f"lr × {self.lr_scale:g}{decay}"


RUN_GROUP = Group()


def entry_of(path: str, entries: dict) -> Optional[object]:
    """The plan entry a parameter path belongs to (the longest entry path in front of it)."""
    parts = path.split(".")
    for end in range(len(parts) - 1, 0, -1):
        entry = entries.get(".".join(parts[:end]))
        if entry is not None:
            return entry
    return None


def group_of(entry, leaf: str) -> Group:
    scale = entry.lr_scale
    if entry.loraplus is not None and leaf in LORAPLUS_LEAVES:
        scale *= entry.loraplus
    return Group(scale, entry.weight_decay)


def parameter_groups(plan, paths) -> dict[str, Group]:
    """Trainable parameter path → its group (parameters of no plan entry train at the run's settings)."""
    entries = {e.path: e for e in plan.entries}
    groups = {}
    for path in paths:
        entry = entry_of(path, entries)
        groups[path] = group_of(entry, path.rsplit(".", 1)[-1]) if entry is not None else RUN_GROUP
    return groups


def scaled(learning_rate: Union[float, Callable], scale: float):
    """The run's learning rate (a number or a schedule of the step) times `scale`."""
    if scale == 1.0:
        return learning_rate
    if callable(learning_rate):
        return lambda step: learning_rate(step) * scale
    return learning_rate * scale


def grouped_optimizer(make: Callable, name: str, learning_rate, settings: dict, plan, parameters: dict):
    """`make(learning_rate, **settings)` for every group; a single optimizer when every parameter trains alike
    (the state then has the layout of an ungrouped run), else a `MultiOptimizer` with the run's group last."""
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    groups = parameter_groups(plan, [path for path, _ in tree_flatten(parameters)])
    distinct = sorted(set(groups.values()) - {RUN_GROUP}, key=lambda g: (g.lr_scale, g.weight_decay or -1.0))
    if not distinct:
        return make(learning_rate, **settings)
    if any(g.weight_decay is not None for g in distinct) and "weight_decay" not in inspect.signature(make).parameters:
        line = next(e.rule_span.line for e in plan.entries if e.weight_decay is not None)
        raise UserError(
            f"the spec sets weight_decay (line {line}) but the {name} optimizer has none",
            help="train with --optimizer adamw (or sgd, muon, adafactor), or remove weight_decay from the spec",
        )
    optimizers = []
    for group in distinct + [RUN_GROUP]:
        own = dict(settings)
        if group.weight_decay is not None:
            own["weight_decay"] = group.weight_decay
        optimizers.append(make(scaled(learning_rate, group.lr_scale), **own))
    filters = [lambda path, _value, group=group: groups.get(path, RUN_GROUP) == group for group in distinct]
    return grouped_class(optim.MultiOptimizer)(optimizers, filters)


def grouped_class(base: type) -> type:
    """mlx's MultiOptimizer with the groups' updates joined by path: its own `tree_merge` fails when an earlier
    group's block list is shorter than a later one's that skips blocks (None against {})."""
    from mlx.utils import tree_flatten, tree_unflatten

    class GroupedOptimizer(base):
        def apply_gradients(self, gradients: dict, parameters: dict):
            flat = []
            for optimizer, part in zip(self.optimizers, self._split_dictionary(gradients)):
                flat += tree_flatten(optimizer.apply_gradients(part, parameters))
            return tree_unflatten(flat)

    return GroupedOptimizer


def run_learning_rate(optimizer):
    """The run's learning rate now (that of the parameters no rule scales)."""
    return getattr(optimizer, "optimizers", [optimizer])[-1].learning_rate


def group_table(plan, parameters: dict) -> list[tuple[Group, int]]:
    """(group, number of parameters) for every group other than the run's, for the run's header."""
    from mlx.utils import tree_flatten

    flat = dict(tree_flatten(parameters))
    counts: dict[Group, int] = {}
    for path, group in parameter_groups(plan, list(flat)).items():
        if group != RUN_GROUP:
            counts[group] = counts.get(group, 0) + flat[path].size
    return sorted(counts.items(), key=lambda item: item[0].lr_scale)
