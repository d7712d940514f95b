"""Experts as transformers ≥ 5 stores them, fused 3-D parameters that PEFT adapts through `target_parameters`, ↔ the
MLX switch modules mlx-lm stacks them into.

transformers 5 keeps the routed experts of a block in one module, `mlp.experts`, with `gate_up_proj` (E, 2·inter,
hidden) — the gate rows first, then the up rows — and `down_proj` (E, hidden, inter): (experts, out, in), as
`nn.functional.linear` reads them. PEFT's ParamWrapper gives each such parameter per-expert LoRA factors of one rank r
held in two matrices: `lora_A.weight` (E·r, in), expert-major (rows e·r … e·r+r-1 are expert e's A), and
`lora_B.weight` (out, r·E), expert-minor (column k·E + e is column k of expert e's B); the delta of expert e is
`scale · B_e @ A_e`. Wrappers nest when both parameters of one module are targeted: the first parameter the module
registers (`gate_up_proj`) is wrapped first and ends up innermost, so its factors are saved under
`experts.base_layer.lora_A` and those of `down_proj` under `experts.lora_A`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from ..model.index import ModuleIndex

# Model types whose transformers 5 expert classes have exactly the layout above (checked against transformers 5.25's
# MixtralExperts, Qwen2MoeExperts, Qwen3MoeExperts and OlmoeExperts).
FUSED_MODEL_TYPES = frozenset({"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"})
# The block's MoE container as transformers 5 names it, where mlx-lm keeps an older name.
CONTAINER_RENAMES = {"mixtral": {"block_sparse_moe": "mlp"}}
PARAM_ORDER = ("gate_up_proj", "down_proj")
MLX_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
LAYOUTS = ("per-expert", "target-parameters")


@dataclass(frozen=True)
class FusedParam:
    """One fused expert parameter: its transformers 5 name and the MLX switch modules it holds, in row order."""

    key: str
    name: str
    mlx_paths: tuple[str, ...]
    experts: int
    input_dims: int
    output_dims: tuple[int, ...]

    @property
    def container(self) -> str:
        return self.key.rpartition(".")[0]


def layout_of_version(version: Optional[str]) -> str:
    """The PEFT layout of experts for the transformers version a model's config.json names (per-expert before 5)."""
    match = re.match(r"\s*(\d+)\.", version or "")
    return "target-parameters" if match and int(match[1]) >= 5 else "per-expert"


def _t5_owner(owner: str, model_type: Optional[str]) -> str:
    renames = CONTAINER_RENAMES.get(model_type or "", {})
    parts = owner.split(".")
    return ".".join([*parts[:-1], renames.get(parts[-1], parts[-1])]) if parts else owner


def fused_params(index: ModuleIndex) -> list[FusedParam]:
    """Every fused expert parameter of the model under transformers 5's names (none for an unknown layout)."""
    switches: dict[str, dict[str, object]] = {}
    for info in index:
        if info.family == "switch":
            switches.setdefault(info.parent, {})[info.name] = info
    out = []
    for container, members in switches.items():
        owner = container.rpartition(".")[0] if container.endswith("switch_mlp") else container
        prefix = f"{_t5_owner(owner, index.model_type)}.experts"
        for name in PARAM_ORDER:
            parts = [members.get(part) for part in MLX_PARTS[name]]
            if any(part is None for part in parts):
                continue
            out.append(
                FusedParam(
                    key=f"{prefix}.{name}",
                    name=name,
                    mlx_paths=tuple(p.path for p in parts),
                    experts=parts[0].num_experts or 0,
                    input_dims=parts[0].input_dims,
                    output_dims=tuple(p.output_dims for p in parts),
                )
            )
    return out


def layout_problem(index: ModuleIndex) -> Optional[str]:
    """Why the model's experts have no known transformers 5 fused layout, or None."""
    if not any(info.family == "switch" for info in index):
        return None
    if index.model_type not in FUSED_MODEL_TYPES:
        return (
            f"the fused expert layout of transformers 5 is known for {', '.join(sorted(FUSED_MODEL_TYPES))}, "
            f"not for model type {index.model_type!r}"
        )
    switch = [info for info in index if info.family == "switch"]
    grouped = {p for param in fused_params(index) for p in param.mlx_paths}
    missing = [info.path for info in switch if info.path not in grouped]
    if missing:
        return f"'{missing[0]}' has no place in transformers 5's gate_up_proj / down_proj"
    return None


def is_param_targeted(config: dict, key: str) -> bool:
    """PEFT's matching of `target_parameters`: the parameter's full name, or a suffix of it at a dot."""
    targets = config.get("target_parameters") or ()
    return key in targets or any(key.endswith(f".{target}") for target in targets)


def nesting_keys(container: str, names: list[str]) -> dict[str, str]:
    """The module key each targeted parameter's factors are saved under: the first wrapped is the innermost."""
    ordered = [name for name in PARAM_ORDER if name in names]
    depth = len(ordered)
    return {name: container + ".base_layer" * (depth - 1 - i) for i, name in enumerate(ordered)}


def _moe_owners(index: ModuleIndex) -> set[str]:
    owners = set()
    for info in index:
        if info.family == "switch":
            container = info.parent
            owners.add(container.rpartition(".")[0] if container.endswith("switch_mlp") else container)
    return owners


def router_paths(index: ModuleIndex) -> set[str]:
    """The routers of MoE blocks (`mlp.gate`): Linear in MLX; in transformers 5 a router class that is no Linear, so
    PEFT reaches its weight only through target_parameters (`mlp.gate.weight`, a 2-D ParamWrapper: plain LoRA)."""
    paths = {f"{owner}.gate" for owner in _moe_owners(index)}
    return {path for path in paths if path in index and index[path].family == "linear"}


@dataclass(frozen=True)
class RouterParam:
    """A router's weight under transformers 5's name, and its MLX Linear."""

    key: str
    mlx_path: str

    @property
    def container(self) -> str:
        return self.key.rpartition(".")[0]


def router_params(index: ModuleIndex) -> list[RouterParam]:
    """The routers' weights as transformers 5 names them (known fused layouts only)."""
    if index.model_type not in FUSED_MODEL_TYPES:
        return []
    out = []
    for path in sorted(router_paths(index)):
        owner = path.rpartition(".")[0]
        out.append(RouterParam(f"{_t5_owner(owner, index.model_type)}.gate.weight", path))
    return out
