"""Module names as Hugging Face models print them ↔ MLX module paths (mlx-lm's `sanitize` conventions).

mlx-lm keeps Hugging Face's module names except for mixture-of-experts layers, whose per-expert
Linear modules (`mlp.experts.3.gate_proj`) it stacks into one SwitchLinear (`mlp.switch_mlp.gate_proj`),
renaming Mixtral-style `w1`/`w2`/`w3` on the way. The renames per model type are `model.hf_moe`'s table,
the one the directory index stacks a Hugging Face checkpoint by.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from ..model import hf_moe
from ..model.index import ModuleIndex, ModuleInfo
from .fused_experts import router_paths

SWITCH_CONTAINERS = tuple(sorted(hf_moe.switch_containers(), reverse=True))  # ("switch_mlp", "experts")
EXPERT_KEY = re.compile(r"^(?P<parent>.*)\.experts\.(?P<expert>\d+)\.(?P<name>[^.]+)$")


@dataclass(frozen=True)
class HfModule:
    """One module as the Hugging Face model names it, and the MLX module (and expert) it lives in."""

    key: str
    mlx_path: str
    family: str
    expert: Optional[int] = None


def expert_renames(model_type: Optional[str]) -> dict[str, str]:
    """Hugging Face expert projection name → MLX name for this model type."""
    return dict(hf_moe.expert_renames(model_type))


def hf_expert_name(mlx_name: str, model_type: Optional[str]) -> str:
    inverse = {mlx: hf for hf, mlx in expert_renames(model_type).items()}
    return inverse.get(mlx_name, mlx_name)


def expert_prefix(info: ModuleInfo) -> str:
    """`model.layers.0.mlp.experts` for the switch module `model.layers.0.mlp.switch_mlp.gate_proj`."""
    container = info.parent
    owner, _, container_name = container.rpartition(".")
    if container_name == "experts":
        return container
    return f"{owner}.experts" if owner else "experts"


def hf_modules(index: ModuleIndex, layout: str = "per-expert") -> list[HfModule]:
    """Every module of the model under its Hugging Face name: a switch module becomes one module per expert
    (transformers 4), or none with the `target-parameters` layout (transformers 5 fuses the experts into parameters
    and routes with a class PEFT cannot adapt)."""
    switch_containers = {m.parent for m in index if m.family == "switch"}
    fused = layout == "target-parameters"
    routers = router_paths(index) if fused else set()
    out: list[HfModule] = []
    for info in index:
        if info.path in switch_containers or info.path in routers:
            continue
        if info.family == "switch":
            if fused:
                continue
            prefix = expert_prefix(info)
            name = hf_expert_name(info.name, index.model_type)
            for expert in range(info.num_experts or 0):
                out.append(HfModule(f"{prefix}.{expert}.{name}", info.path, "linear", expert))
        else:
            out.append(HfModule(info.path, info.path, info.family))
    return out


def mlx_module(key: str, index: ModuleIndex) -> Optional[tuple[str, Optional[int]]]:
    """The MLX path (and expert number) of a Hugging Face module name, or None when the model has no such module."""
    if key in index and index[key].family != "switch":
        return key, None
    match = EXPERT_KEY.match(key)
    if match is None:
        return None
    parent, name = match["parent"], match["name"]
    name = expert_renames(index.model_type).get(name, name)
    for container in SWITCH_CONTAINERS:
        path = f"{parent}.{container}.{name}" if container == "switch_mlp" else f"{parent}.experts.{name}"
        if path in index and index[path].family == "switch":
            expert = int(match["expert"])
            if expert < (index[path].num_experts or 0):
                return path, expert
    return None


def mlx_selector_name(name: str, model_type: Optional[str]) -> str:
    """A PEFT target name in MLX terms: expert projections renamed as mlx-lm's sanitize does."""
    renames = expert_renames(model_type)
    parts = name.split(".")
    if parts[-1] in renames:
        parts[-1] = renames[parts[-1]]
        if len(parts) == 1 or parts[-2] != "switch_mlp":
            parts.insert(len(parts) - 1, "switch_mlp")
    return ".".join(parts)
