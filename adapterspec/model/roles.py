"""What a module does in a mixture of experts — routed expert, shared expert, router — from the module tree
alone (the same answer live and from a model directory). Pure Python, no mlx."""

from __future__ import annotations

import re
import weakref

from ..language.validate import ROLE_WORDS as ROLE_FILTERS
from .families import ATTENTION_WORD, SHARED_WORD, is_routed_expert

# names mlx-lm gives a mixture's router (or the module holding it: laguna's mlp.gate.proj)
ROUTER_NAMES = frozenset({"gate", "router", "gate_inp", "wg", "w_gate", "gate_proj_router"})


def routed_experts(index) -> list[str]:
    """Paths of the adaptable modules that are routed experts (SwitchLinears, or linears of per-expert lists)."""
    return [info.path for info in index if is_routed_expert(info)]


def _moe_parents(index, experts: list[str]) -> set[str]:
    """The modules that hold a mixture: the parent of each expert container (switch_mlp, experts)."""
    holders = set()
    for path in experts:
        parts = path.split(".")
        for i in range(len(parts) - 1, 0, -1):
            if parts[i] in ("switch_mlp", "experts", "mlp", "moe") or "switch" in parts[i]:
                holders.add(".".join(parts[:i]))
                break
    return holders


def routers(index, experts: list[str] | None = None) -> list[str]:
    """Paths of the adaptable linears that route tokens to experts: named like a router, beside the experts."""
    experts = routed_experts(index) if experts is None else experts
    if not experts:
        return []
    holders = _moe_parents(index, experts)
    found = []
    for info in index:
        if info.family != "linear" or SHARED_WORD.search(info.path) or is_routed_expert(info):
            continue
        parts = info.path.split(".")
        for depth in (1, 2):  # mlp.gate, or mlp.gate.proj
            if len(parts) > depth and parts[-depth] in ROUTER_NAMES and ".".join(parts[:-depth]) in holders:
                found.append(info.path)
                break
    return found


# ── role type filters: @experts, @shared_expert, @router, @attention, @mlp, @head ──────────────────

MLP_WORD = re.compile(r"mlp|ffn|feed_forward|block_sparse_moe|moe", re.IGNORECASE)
HEAD_NAMES = frozenset({"lm_head", "embed_out", "output"})
_ROLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def roles(index) -> dict[str, frozenset[str]]:
    """Role filter name (without '@') → the paths of the adaptable modules in that role; once per index."""
    found = _ROLES.get(index)
    if found is not None:
        return found
    experts = routed_experts(index)
    routing = set(routers(index, experts))
    routed = set(experts)
    blocks = getattr(index, "block_list", None)
    mixtures = tuple(holder + "." for holder in _moe_parents(index, experts))
    out: dict[str, set[str]] = {name: set() for name in ROLE_FILTERS}
    out["experts"], out["router"] = routed, routing
    for info in index:
        if not info.adaptable:
            continue
        if info.family == "embedding":
            out["embedding"].add(info.path)
            continue
        if info.name in HEAD_NAMES and (blocks is None or not info.path.startswith(blocks + ".")):
            out["head"].add(info.path)
            continue
        if info.path in routed or info.path in routing:
            continue
        segments = info.path.split(".")[:-1]
        if routed and SHARED_WORD.search(info.path):
            out["shared_expert"].add(info.path)
        in_mixture = info.path.startswith(mixtures)  # nemotron_h's MoE is its block's `mixer`
        if not in_mixture and any(ATTENTION_WORD.search(s) for s in segments):
            out["attention"].add(info.path)
        elif in_mixture or any(MLP_WORD.search(s) for s in segments):
            out["mlp"].add(info.path)
    found = {name: frozenset(paths) for name, paths in out.items()}
    _ROLES[index] = found
    return found


def module_roles(index, path: str) -> list[str]:
    """The role filters a module passes (for `tree`)."""
    return [name for name, paths in roles(index).items() if path in paths]
