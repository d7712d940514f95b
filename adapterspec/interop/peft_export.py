"""A plan → PEFT LoRA `adapter_config.json`: the shortest target_modules / rank_pattern / alpha_pattern that make
PEFT pick exactly the plan's modules with their ranks and scales (each candidate checked with PEFT's matching)."""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Optional

from ..errors import UserError
from ..model.index import ModuleIndex
from ..model.kinds import KINDS
from ..model.mlxlm import block_list_path
from ..model.plan import Plan
from . import peft_match
from .findings import Finding, note
from .hf_names import hf_modules
from .peft_weights import hf_names_of


def _alpha(r: int, scale: float) -> float:
    alpha = scale * r
    return float(round(alpha)) if math.isclose(alpha, round(alpha), rel_tol=1e-12) else alpha


def wanted_modules(plan: Plan, index: ModuleIndex) -> tuple[dict[str, tuple[int, float]], list[str], str]:
    """Hugging Face name → (r, alpha) of every adapted module, the names PEFT must train whole, and lora/dora."""
    adapted: dict[str, tuple[int, float]] = {}
    saved: list[str] = []
    kinds = set()
    for entry in plan.entries:
        if entry.adapter == "full":
            saved += hf_names_of(entry.path, index)
            continue
        if entry.adapter == "dora-embedding":
            raise UserError(
                f"'{entry.path}' has a {entry.adapter} adapter, which PEFT has no equivalent for",
                help="PEFT's DoRA embedding normalises columns, adapterspec's rows; use lora on embeddings",
            )
        if entry.adapter == "switch-dora":
            raise UserError(
                f"'{entry.path}' has a switch-dora adapter (DoRA on experts), which PEFT has no equivalent for",
                help="PEFT adapts experts stored as one tensor through target_parameters, which does not work "
                "with use_dora; use lora on the experts to export to PEFT",
            )
        kinds.add(KINDS[entry.adapter].transform)
        for name in hf_names_of(entry.path, index):
            adapted[name] = (entry.r, _alpha(entry.r, entry.scale))
    if len(kinds) > 1:
        raise UserError(
            "the plan mixes lora and dora; one PEFT adapter is either LoRA or DoRA (use_dora)",
            help="export a plan with one kind, or split it into two specs",
        )
    return adapted, saved, kinds.pop() if kinds else "lora"


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def target_candidates(adapted: dict, index: ModuleIndex) -> list[dict]:
    """Ways to write target_modules, shortest first."""
    names = sorted({_leaf(k) for k in adapted})
    candidates: list[dict] = [{"target_modules": names}]
    blocks = block_list_path(index)
    if blocks:
        prefix = blocks + "."
        positions = sorted({int(k[len(prefix) :].split(".")[0]) for k in adapted if k.startswith(prefix)})
        if positions:
            candidates.append(
                {"target_modules": names, "layers_to_transform": positions, "layers_pattern": _leaf(blocks)}
            )
    candidates.append({"target_modules": sorted(adapted)})
    candidates.append({"target_modules": "|".join(re.escape(k) for k in sorted(adapted))})
    return candidates


def pattern_candidates(adapted: dict, default: tuple[int, float]) -> list[tuple[dict, dict]]:
    """(rank_pattern, alpha_pattern) pairs: by module name where uniform, else one key per module."""
    r0, alpha0 = default
    by_leaf: dict[str, set] = {}
    for key, value in adapted.items():
        by_leaf.setdefault(_leaf(key), set()).add(value)
    ranks, alphas = {}, {}
    for leaf, values in sorted(by_leaf.items()):
        if len(values) == 1:
            r, alpha = next(iter(values))
            if r != r0:
                ranks[leaf] = r
            if alpha != alpha0:
                alphas[leaf] = alpha
    per_module_r = {re.escape(k): r for k, (r, _) in sorted(adapted.items()) if r != r0}
    per_module_alpha = {re.escape(k): a for k, (_, a) in sorted(adapted.items()) if a != alpha0}
    return [(ranks, alphas), (per_module_r, per_module_alpha)]


def chooses(config: dict, adapted: dict, saved: list[str], keys: list[str]) -> bool:
    """Whether PEFT's matching, run on the model's module names, gives exactly `adapted` and `saved`."""
    targeted = {k: peft_match.rank_and_alpha(config, k) for k in keys if peft_match.is_targeted(config, k)}
    wrapped = [k for k in keys if peft_match.is_saved(config, k)]
    return targeted == adapted and sorted(wrapped) == sorted(saved)


def peft_config(plan: Plan, index: ModuleIndex, base_model: Optional[str] = None) -> tuple[dict, list[Finding]]:
    """The PEFT LoRA config whose module choice on this model equals the plan's."""
    adapted, saved, kind = wanted_modules(plan, index)
    findings: list[Finding] = []
    lora_entries = [e for e in plan.entries if e.adapter != "full"]
    dropouts = Counter(e.dropout for e in lora_entries)
    if len(dropouts) > 1:
        findings.append(
            note(
                f"PEFT has one lora_dropout; the plan uses {len(dropouts)} values, "
                f"exported as the most common ({dropouts.most_common(1)[0][0]:g})"
            )
        )
    default = Counter(adapted.values()).most_common(1)[0][0] if adapted else (8, 8.0)
    base = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": default[0],
        "lora_alpha": default[1],
        "lora_dropout": dropouts.most_common(1)[0][0] if dropouts else 0.0,
        "use_rslora": False,
        "use_dora": kind == "dora",
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": saved or None,
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }
    keys = [m.key for m in hf_modules(index)]
    for targets in target_candidates(adapted, index):
        for ranks, alphas in pattern_candidates(adapted, default):
            config = {**base, **targets, "rank_pattern": ranks, "alpha_pattern": alphas}
            if chooses(config, adapted, saved, keys):
                return config, findings
    raise UserError(
        "no PEFT config reproduces this plan's choice of modules",
        help="a module kept out by modules_to_save, or names PEFT cannot tell apart",
    )
