"""A plan → PEFT LoRA `adapter_config.json`: the shortest target_modules / rank_pattern / alpha_pattern that make
PEFT pick exactly the plan's modules with their ranks and scales (each candidate checked with PEFT's matching)."""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Optional

from ..errors import UserError
from ..model.index import ModuleIndex
from ..model.kinds import KINDS, TOKEN_KINDS
from ..model.mlxlm import block_list_path
from ..model.plan import Plan
from . import peft_match
from .findings import Finding, note
from .fused_experts import fused_params, is_param_targeted, router_params, router_paths
from .hf_names import hf_modules
from .peft_training import exported_indices
from .peft_weights import hf_names_of


def _alpha(r: int, scale: float) -> float:
    alpha = scale * r
    return float(round(alpha)) if math.isclose(alpha, round(alpha), rel_tol=1e-12) else alpha


def wanted_modules(
    plan: Plan, index: ModuleIndex, layout: str = "per-expert"
) -> tuple[dict[str, tuple[int, float]], list[str], str]:
    """Hugging Face name → (r, alpha) of every adapted module, the names PEFT must train whole, and lora/dora. With
    the `target-parameters` layout the switch modules are left to the fused parameters."""
    adapted: dict[str, tuple[int, float]] = {}
    saved: list[str] = []
    kinds = set()
    routers = router_paths(index) if layout == "target-parameters" else set()
    for entry in plan.entries:
        if entry.path in routers:
            if entry.adapter != "lora":
                raise UserError(
                    f"'{entry.path}' is the router of a mixture-of-experts block and has a {entry.adapter} adapter; "
                    "transformers 5 routes with a class that is no Linear, whose weight PEFT adapts only with LoRA "
                    "(target_parameters)",
                    help="use lora on the router or leave it out, or export with --peft-layout per-expert "
                    "for transformers 4",
                )
            continue
        if layout == "target-parameters" and index[entry.path].family == "switch":
            if entry.adapter == "full":
                raise UserError(
                    f"'{entry.path}' is trained whole; transformers 5 keeps the experts as fused parameters, which "
                    "PEFT's modules_to_save cannot hold",
                    help="export with --peft-layout per-expert for transformers 4",
                )
            continue
        if entry.adapter == "full":
            saved += hf_names_of(entry.path, index)
            continue
        if entry.adapter in TOKEN_KINDS:  # trainable_token_indices, not a target
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


def exported_init(plan: Plan):
    """PEFT's init_lora_weights: "gaussian" when every adapter started so, else True (mlx-lm's start is PEFT's
    default in kind; PiSSA / OLoRA adapters were saved as plain deltas on the original weights)."""
    inits = {e.init for e in plan.entries if e.adapter not in ("full", *TOKEN_KINDS)}
    return "gaussian" if inits == {"gaussian"} else True


def training_findings(plan: Plan) -> list[Finding]:
    """Notes for the per-rule training settings a PEFT config does not carry."""
    keys = sorted({k for e in plan.entries for k in e.training_json() if k in ("lr_scale", "loraplus", "weight_decay")})
    if not keys:
        return []
    return [
        note(
            f"the spec's {', '.join(keys)} set how the adapters trained; PEFT's config has no such fields "
            "(LoRA+ and per-group learning rates are optimizer settings there), so they are not exported"
        )
    ]


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


def chooses(
    config: dict, adapted: dict, saved: list[str], keys: list[str], params: Optional[dict] = None, param_keys=()
) -> bool:
    """Whether PEFT's matching, run on the model's module (and fused parameter) names, gives exactly `adapted`,
    `params` and `saved`."""
    targeted = {k: peft_match.rank_and_alpha(config, k) for k in keys if peft_match.is_targeted(config, k)}
    wrapped = [k for k in keys if peft_match.is_saved(config, k)]
    targeted_params = {k: peft_match.rank_and_alpha(config, k) for k in param_keys if is_param_targeted(config, k)}
    return targeted == adapted and sorted(wrapped) == sorted(saved) and targeted_params == (params or {})


def parameter_candidates(params: dict, param_keys: list[str]) -> list[list[str]]:
    """Ways to write target_parameters: `experts.NAME` suffixes, then the full names."""
    if not params:
        return [[]]
    return [sorted({".".join(k.split(".")[-2:]) for k in params}), sorted(params)]


class NotTied(Exception):
    """This way of writing target_modules would not make PEFT tie the head to the embedding's adapter."""


def tie_head(config: dict, plan: Plan, index: ModuleIndex, adapted: dict, saved: list[str]) -> Optional[str]:
    """Set ensure_weight_tying when the plan adapts or trains an embedding tied to the output head: PEFT then sends
    the head through the embedding's adapter (or trained copy), as MLX does. Returns the embedding's name."""
    if not index.tied_embeddings:
        return None
    embedding = next(
        (name for name in list(adapted) + saved if name in index and index[name].family == "embedding"), None
    )
    if embedding is None:
        return None
    if embedding in adapted and not peft_match.names_tied_layer(config["target_modules"]):
        raise NotTied
    config["ensure_weight_tying"] = True
    if embedding in adapted and peft_match.rank_and_alpha(config, "lm_head") != adapted[embedding]:
        r, alpha = adapted[embedding]
        config["rank_pattern"] = {**config["rank_pattern"], "lm_head": r}
        config["alpha_pattern"] = {**config["alpha_pattern"], "lm_head": alpha}
    return embedding


def peft_config(
    plan: Plan,
    index: ModuleIndex,
    base_model: Optional[str] = None,
    layout: str = "per-expert",
    fused: Optional[dict[str, tuple[int, float]]] = None,
) -> tuple[dict, list[Finding]]:
    """The PEFT LoRA config whose module choice on this model equals the plan's; `fused` gives the (r, scale) of each
    transformers 5 expert parameter the plan adapts (the `target-parameters` layout)."""
    adapted, saved, kind = wanted_modules(plan, index, layout)
    params = {key: (r, _alpha(r, scale)) for key, (r, scale) in (fused or {}).items()}
    findings: list[Finding] = []
    lora_entries = [e for e in plan.entries if e.adapter != "full" and e.adapter not in TOKEN_KINDS]
    findings += training_findings(plan)
    dropouts = Counter(e.dropout for e in lora_entries)
    dropout = dropouts.most_common(1)[0][0] if dropouts else 0.0
    if len(dropouts) > 1:
        findings.append(
            note(
                f"PEFT has one lora_dropout; the plan uses {len(dropouts)} values, "
                f"exported as the most common ({dropouts.most_common(1)[0][0]:g})"
            )
        )
    if params and dropout:
        findings.append(note("PEFT's target_parameters take no dropout: lora_dropout is written as 0"))
        dropout = 0.0
    if params and kind == "dora":
        raise UserError(
            "the plan has DoRA, and transformers 5's fused experts need target_parameters, which PEFT adapts with "
            "LoRA only (one PEFT adapter is either LoRA or DoRA)",
            help="export with --peft-layout per-expert for transformers 4, or use lora",
        )
    both = {**adapted, **params}
    default = Counter(both.values()).most_common(1)[0][0] if both else (8, 8.0)
    base = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": default[0],
        "lora_alpha": default[1],
        "lora_dropout": dropout,
        "use_rslora": False,
        "use_dora": kind == "dora",
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": exported_init(plan),
        "trainable_token_indices": exported_indices(plan, index),
        "modules_to_save": saved or None,
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }
    keys = [m.key for m in hf_modules(index, layout)]
    param_keys = [p.key for p in [*fused_params(index), *router_params(index)]] if layout == "target-parameters" else []
    for targets in target_candidates(adapted, index):
        for parameters in parameter_candidates(params, param_keys):
            for ranks, alphas in pattern_candidates(both, default):
                config = {**base, **targets, "rank_pattern": ranks, "alpha_pattern": alphas}
                if parameters:
                    config["target_parameters"] = parameters
                try:
                    tie_head(config, plan, index, adapted, saved)
                except NotTied:
                    continue
                if chooses(config, adapted, saved, keys, params, param_keys):
                    return config, findings
    raise UserError(
        "no PEFT config reproduces this plan's choice of modules",
        help="a module kept out by modules_to_save, or names PEFT cannot tell apart",
    )
