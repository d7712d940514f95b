"""PEFT LoRA config → spec text: a readable rule-for-rule translation, checked against PEFT's exact choice on a model.

Without a model the translation is structural (target names become selectors, `exclude_modules` become
`none` rules, `rank_pattern`/`alpha_pattern` become later rules, `modules_to_save` become `full`).
With a model, PEFT's matching is run on the model's module names (Hugging Face names, see hf_names);
when the structural spec's plan differs from that choice, or the config uses regular expressions,
the spec names the chosen modules explicitly instead.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

from ..errors import UserError
from ..model.index import ModuleIndex
from ..model.names import shown
from . import peft_match
from .findings import Finding, as_comments, lossy, note
from .fused_experts import (
    FusedParam,
    RouterParam,
    fused_params,
    is_param_targeted,
    layout_problem,
    router_params,
    router_paths,
)
from .hf_names import HfModule, hf_modules, mlx_selector_name
from .peft_config import bias_findings, unsupported
from .spec_writer import Assignment, call, explicit_rules

PLAIN_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
PARTIAL_EXPERTS = re.compile(r"(^|\.)experts\.\d+(\.|$)")


class NeedsModel(Exception):
    """The config says something only its resolution against a model's module names can turn into rules."""


@dataclass
class PeftChoice:
    """What PEFT does on one model: each MLX module's assignment, and per-expert factors for switch modules."""

    assignments: dict[str, Assignment] = field(default_factory=dict)
    expert_factors: dict[str, dict[int, float]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    fused: list[FusedParam] = field(default_factory=list)
    layout: str = "per-expert"
    tied_head: Optional[str] = None
    routers: list[RouterParam] = field(default_factory=list)


@dataclass
class PeftTranslation:
    text: str
    findings: list[Finding]
    explicit: bool
    choice: Optional[PeftChoice] = None

    @property
    def lossy(self) -> list[Finding]:
        return [f for f in self.findings if f.lossy]


def adapter_kind(config: dict) -> str:
    return "dora" if config.get("use_dora") else "lora"


def scale_of(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def defaults_arguments(config: dict) -> dict:
    out = {"r": int(config.get("r", 8)), "alpha": float(config.get("lora_alpha", 8))}
    out["rslora"] = bool(config.get("use_rslora"))
    out["dropout"] = float(config.get("lora_dropout") or 0.0)
    return out


# ── PEFT's exact choice on a model ──────────────────────────────────────────


def peft_modules(index: ModuleIndex, layout: str = "per-expert") -> list[HfModule]:
    """The model's modules under Hugging Face names, plus the tied `lm_head` that MLX models leave out."""
    modules = hf_modules(index, layout)
    if index.tied_embeddings and "lm_head" not in index:
        modules.append(HfModule("lm_head", "", "linear"))
    return modules


def resolved_config(config: dict, modules: list[HfModule]) -> dict:
    linear = [m.key for m in modules if m.family == "linear"]
    output = "lm_head" if any(m.key == "lm_head" for m in modules) else None
    return peft_match.expand_all_linear(config, linear, output)


def peft_choice(config: dict, index: ModuleIndex, layout: str = "per-expert") -> PeftChoice:
    """Which modules PEFT adapts (and with which r and alpha) or trains whole, as MLX module assignments."""
    choice = PeftChoice(layout=layout)
    modules = peft_modules(index, layout)
    config = _tied_targets(resolved_config(config, modules), modules, index)
    kind, rslora = adapter_kind(config), bool(config.get("use_rslora"))
    dropout = float(config.get("lora_dropout") or 0.0)
    chosen: dict[str, dict[Optional[int], tuple[int, float]]] = defaultdict(dict)
    ties = choice.tied_head = _ties_head(config, modules, index)
    for module in modules:
        if not peft_match.is_targeted(config, module.key):
            continue
        if not module.mlx_path and ties:
            continue
        if not module.mlx_path:
            choice.findings.append(
                lossy(
                    f"PEFT adapts '{module.key}', which the MLX model has no module for "
                    "(its output head is tied to the embedding)"
                )
            )
        elif module.family not in ("linear", "embedding"):
            choice.findings.append(
                lossy(
                    f"PEFT targets '{module.key}' ({index[module.mlx_path].cls}), "
                    "which it cannot adapt (PEFT would refuse this config on this model)"
                )
            )
        else:
            chosen[module.mlx_path][module.expert] = peft_match.rank_and_alpha(config, module.key)
    for path, ranks in chosen.items():
        info = index[path]
        if info.family == "switch":
            _switch_assignment(choice, path, ranks, info.num_experts or 0, kind, rslora, dropout)
            continue
        r, alpha = ranks[None]
        choice.assignments[path] = Assignment(kind, r, alpha, rslora, dropout=dropout)
        if info.family == "embedding":
            if kind == "dora":
                choice.findings.append(
                    lossy(
                        f"DoRA on the embedding '{path}': PEFT normalises embedding columns, "
                        "adapterspec's DoRA embedding normalises rows"
                    )
                )
            if index.tied_embeddings and not ties:
                choice.findings.append(
                    lossy(
                        f"'{path}' is tied to the output head: in MLX the head goes through "
                        "the embedding's adapter too, in PEFT it does not"
                    )
                )
    if ties and peft_match.rank_and_alpha(config, "lm_head") != peft_match.rank_and_alpha(config, ties):
        choice.findings.append(
            lossy(
                f"ensure_weight_tying ties the output head to '{ties}', but rank_pattern/alpha_pattern give "
                "'lm_head' another r or alpha, so PEFT scales the head's copy of the adapter differently"
            )
        )
    _fused_choice(choice, config, index, rslora, dropout)
    _saved_modules(choice, config, modules, index)
    if layout == "target-parameters":
        fused_modules = sorted({p.container for p in fused_params(index)} | {r.container for r in router_params(index)})
        for key in fused_modules:
            if peft_match.is_saved(config, key):
                choice.findings.append(
                    lossy(f"modules_to_save trains '{key}', transformers 5's fused experts or router, whole; not read")
                )
    return choice


def _tied_targets(config: dict, modules: list[HfModule], index: ModuleIndex) -> dict:
    """PEFT's `_add_targets_to_tie`: with `ensure_weight_tying` on a tied model, a target named like an embedding
    or the head (`embed_tokens`, `lm_head`) puts the input embedding among the targets and takes the head out."""
    targets = config.get("target_modules")
    embedding = next((m.key for m in modules if m.family == "embedding" and m.key.endswith("embed_tokens")), None)
    if not (index.tied_embeddings and config.get("ensure_weight_tying")) or embedding is None or not targets:
        return config
    if not peft_match.names_tied_layer(targets):
        return config
    if isinstance(targets, str):
        return {**config, "target_modules": rf"(?:{targets}|^{re.escape(embedding)}$)"}
    names = list(dict.fromkeys([*targets, embedding]))
    for name in names:
        if re.match(rf"(^|.*\.){name}($|\..*)", "lm_head"):
            names.remove(name)
            break
    return {**config, "target_modules": names}


def _ties_head(config: dict, modules: list[HfModule], index: ModuleIndex) -> Optional[str]:
    """The embedding whose LoRA PEFT shares with the tied output head (`ensure_weight_tying` with the embedding
    targeted), so that the head goes through the embedding's adapter as it does in MLX; None when PEFT does not."""
    if not (index.tied_embeddings and config.get("ensure_weight_tying")):
        return None
    for module in modules:
        if module.family == "embedding" and peft_match.is_targeted(config, module.key):
            return module.key
    return None


def _fused_choice(choice: PeftChoice, config: dict, index: ModuleIndex, rslora: bool, dropout: float) -> None:
    """The switch modules PEFT adapts through `target_parameters` (transformers 5's fused experts), exactly: the
    per-expert factors of `gate_up_proj` split by rows into gate_proj and up_proj, which share A."""
    if not config.get("target_parameters"):
        return
    problem = layout_problem(index)
    if problem:
        choice.findings.append(lossy(f"target_parameters {config['target_parameters']}: {problem}"))
        return
    if adapter_kind(config) == "dora":
        choice.findings.append(lossy("target_parameters with use_dora: PEFT refuses DoRA on parameters"))
        return
    params = [p for p in fused_params(index) if is_param_targeted(config, p.key)]
    routers = [p for p in router_params(index) if is_param_targeted(config, p.key)]
    others = [
        f"{info.path}.{name}"
        for info in index
        if info.family != "switch" and info.has_params and info.path not in router_paths(index)
        for name in ("weight", "bias")
        if is_param_targeted(config, f"{info.path}.{name}")
    ]
    if others:
        choice.findings.append(
            lossy(f"target_parameters adapts '{others[0]}', a parameter other than fused experts; only those are read")
        )
    if not params and not routers:
        choice.findings.append(
            note(f"target_parameters {config['target_parameters']} names no fused expert parameter of this model")
        )
    for param in params:
        r, alpha = peft_match.rank_and_alpha(config, param.key)
        for path in param.mlx_paths:
            choice.assignments[path] = Assignment("lora", r, alpha, rslora, dropout=dropout)
    for router in routers:
        r, alpha = peft_match.rank_and_alpha(config, router.key)
        choice.assignments[router.mlx_path] = Assignment("lora", r, alpha, rslora, dropout=dropout)
    choice.fused = params
    choice.routers = routers


def _switch_assignment(
    choice: PeftChoice, path: str, ranks: dict, experts: int, kind: str, rslora: bool, dropout: float
) -> None:
    if kind == "dora":
        choice.findings.append(
            lossy(f"DoRA on the experts of '{path}': PEFT's per-expert DoRA is not imported into switch-DoRA")
        )
        return
    r = max(rank for rank, _ in ranks.values())
    alpha = next(a for rank, a in ranks.values() if rank == r)
    scale = scale_of(r, alpha, rslora)
    choice.assignments[path] = Assignment("lora", r, alpha, rslora, dropout=dropout)
    choice.expert_factors[path] = {e: scale_of(rank, a, rslora) / scale for e, (rank, a) in ranks.items()}
    if len(ranks) < experts or len(set(ranks.values())) > 1:
        choice.findings.append(
            note(
                f"PEFT adapts {len(ranks)} of the {experts} experts of '{path}' with "
                f"{len(set(ranks.values()))} rank/alpha setting(s); imported as one switch-LoRA "
                f"of rank {r} (others zero-padded and rescaled, so outputs are unchanged)"
            )
        )


def _saved_modules(choice: PeftChoice, config: dict, modules: list[HfModule], index: ModuleIndex) -> None:
    saved = [m for m in modules if peft_match.is_saved(config, m.key)]
    for module in saved:
        if not module.mlx_path or module.expert is not None:
            choice.findings.append(lossy(f"modules_to_save trains '{module.key}', which is no whole MLX module"))
            continue
        if any(module.mlx_path.startswith(other.mlx_path + ".") for other in saved if other.mlx_path):
            continue
        choice.assignments[module.mlx_path] = Assignment("full")


# ── the structural translation ──────────────────────────────────────────────


def selector_for(name: str, model_type: Optional[str]) -> str:
    """A PEFT module name (exact or suffix) as an unanchored selector, or NeedsModel."""
    if not PLAIN_NAME.match(name):
        raise NeedsModel(f"'{name}' is not a plain module name")
    if PARTIAL_EXPERTS.search(name):
        raise NeedsModel(f"'{name}' names single experts, which MLX stacks into one switch layer")
    parts: list[str] = []
    for part in mlx_selector_name(name, model_type).split("."):
        if part.isdigit() and parts and not parts[-1].endswith("]"):
            parts[-1] += f"[{part}]"
        else:
            parts.append(part)
    return ".".join(parts)


def pattern_selector(key: str, model_type: Optional[str]) -> str:
    """A rank/alpha pattern key as a selector: a plain name matches at a dot boundary, `^name` from the root."""
    if key.startswith("^"):
        return "/" + selector_for(key[1:], model_type)
    return selector_for(key, model_type)


def _layer_prefix(config: dict, index: Optional[ModuleIndex]) -> str:
    layers = config.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return ""
    positions = [layers] if isinstance(layers, int) else sorted(set(layers))
    pattern = config.get("layers_pattern")
    if isinstance(pattern, str) and pattern:
        names = [pattern]
    elif isinstance(pattern, list) and pattern:
        names = list(pattern)
    else:
        names = ["*"]
    if any(n != "*" and not re.fullmatch(r"[A-Za-z0-9_]+", n) for n in names):
        raise NeedsModel(f"layers_pattern {pattern!r} is a regular expression")
    name = names[0] if len(names) == 1 else "<" + ",".join(names) + ">"
    return f"{name}[{','.join(str(p) for p in positions)}].**."


def structural_rules(config: dict, index: Optional[ModuleIndex]) -> tuple[list[str], list[Finding]]:
    """Rule lines that say what the config says, one PEFT entry at a time; NeedsModel when they cannot."""
    findings: list[Finding] = []
    model_type = index.model_type if index is not None else None
    kind = adapter_kind(config)
    defaults = defaults_arguments(config)
    targets = config.get("target_modules")
    rules: list[str] = []
    if config.get("target_parameters"):
        raise NeedsModel("target_parameters name fused expert parameters")
    if targets is None:
        raise NeedsModel("the config has no target_modules")
    if peft_match.is_all_linear(targets):
        target_selectors = ["**@linear"]
        if index is not None and any(m.family == "switch" for m in index):
            target_selectors.append("**@switch")
        prefix = ""
    elif isinstance(targets, str):
        raise NeedsModel(f"target_modules is the regular expression {targets!r}")
    else:
        prefix = _layer_prefix(config, index)
        target_selectors = [prefix + selector_for(name, model_type) for name in sorted(targets)]
    rules += [f"{selector}: {kind}" for selector in target_selectors]
    rules += _pattern_rules(config, kind, defaults, targets, prefix, model_type)
    if peft_match.is_all_linear(targets) and (
        index is None or ("lm_head" in index and index["lm_head"].family == "linear")
    ):
        rules.append("/lm_head: none")
        if index is None:
            findings.append(
                note(
                    "all-linear leaves out the output head; the spec says '/lm_head: none' "
                    "(delete that line for a model whose head is tied to the embedding)"
                )
            )
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str):
        raise NeedsModel(f"exclude_modules is the regular expression {exclude!r}")
    for name in sorted(exclude or ()):
        rule, finding = exclude_rule(name, targets, model_type, index)
        rules += [rule] if rule else []
        findings += [finding] if finding else []
    rules += [f"{suffix_selector(name, model_type)}: full" for name in config.get("modules_to_save") or ()]
    return without_overridden(rules), findings


def exclude_rule(
    name: str, targets, model_type, index: Optional[ModuleIndex]
) -> tuple[Optional[str], Optional[Finding]]:
    """The `none` rule for one `exclude_modules` entry, and what to say about it. PEFT excludes a targeted module whose
    own name is the entry or ends with `.entry`, never the modules beneath it, while a spec rule on a container
    reaches everything beneath. A list of targets names the modules they adapt, so an entry is exact when its last
    name is a target's and excludes nothing otherwise; with all-linear only the model can tell."""
    selector = selector_for(name, model_type)
    last = name.rpartition(".")[2]
    if not peft_match.is_all_linear(targets):
        if last in {target.rpartition(".")[2] for target in targets}:
            return f"{selector}: none", None
        return None, note(
            f"exclude_modules '{name}' excludes nothing: PEFT excludes only targeted modules named '{name}' or "
            f"ending in '.{name}', not the modules beneath one, and no target_modules entry ends in '{last}'"
        )
    if index is not None:  # the plan on the model is compared with PEFT's choice
        return f"{selector}: none", None
    return f"{selector}: none", lossy(
        f"exclude_modules '{name}' with all-linear: PEFT leaves out only linear layers named '{name}' or ending in "
        f"'.{name}', nothing beneath a module of that name; without the model the spec cannot tell which '{name}' "
        f"is, and '{selector}: none' also freezes every layer beneath such a module (import with --model MODEL "
        "for PEFT's exact choice)"
    )


def suffix_selector(name: str, model_type: Optional[str]) -> str:
    """A selector for the modules whose names end with `name` as plain text (PEFT's `modules_to_save` matching):
    `norm` is every `*norm` (`input_layernorm` too)."""
    return "*" + selector_for(name, model_type)


def without_overridden(rules: list[str]) -> list[str]:
    """The rules less those a later rule with the very same selector overrides everywhere."""
    selectors = [rule.rpartition(": ")[0] for rule in rules]
    return [rule for i, rule in enumerate(rules) if selectors[i] not in selectors[i + 1 :]]


def _pattern_rules(config: dict, kind: str, defaults: dict, targets, prefix: str, model_type) -> list[str]:
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if ranks and alphas and list(ranks) != list(alphas):
        raise NeedsModel("rank_pattern and alpha_pattern have different keys")
    keys = list(ranks or alphas)
    if keys and prefix and any(re.search(r"(^|\.)\d+(\.|$)", k) for k in keys):
        raise NeedsModel("pattern keys name blocks while layers_to_transform picks blocks too")
    rules = []
    for key in reversed(keys):  # PEFT: the first matching key wins; a spec: the last matching rule wins
        arguments = dict(defaults)
        if key in ranks:
            arguments["r"] = int(ranks[key])
        if key in alphas:
            arguments["alpha"] = float(alphas[key])
        text = call(kind, arguments, defaults)
        for selector in _within_targets(pattern_selector(key, model_type), targets, model_type):
            rules.append(f"{prefix}{selector}{'' if not peft_match.is_all_linear(targets) else '@linear'}: {text}")
    return rules


def _within_targets(selector: str, targets, model_type) -> list[str]:
    """The selector narrowed to the targeted modules: the more specific of it and each target name."""
    if peft_match.is_all_linear(targets):
        return [selector]
    out = []
    own = selector.lstrip("/").split(".")
    for name in sorted(targets):
        target = selector_for(name, model_type).split(".")
        if own[-len(target) :] == target:
            out.append(selector)
        elif not selector.startswith("/") and target[-len(own) :] == own:
            out.append(".".join(target))
    return list(dict.fromkeys(out))


# ── putting it together ─────────────────────────────────────────────────────


def header(source: str, model: Optional[str], explicit: bool) -> list[str]:
    lines = ["adapterspec 1", f"# imported from the PEFT LoRA config {source}"]
    if model:
        lines.append(
            f"# checked against PEFT's module matching on {model}"
            + ("; the modules are named one by one" if explicit else "")
        )
    else:
        lines.append("# translated without a model: check it with 'adapterspec plan MODEL SPEC'")
    return lines


def translate(config: dict, index: Optional[ModuleIndex] = None, **where) -> PeftTranslation:
    """The spec for a PEFT LoRA config (see `_translate`), with a `tokens([...])` rule per trainable_token_indices."""
    from .peft_training import token_rules, with_init

    translation = _translate(config, index, **where)
    translation.text = with_init(translation.text, config)
    model_type = index.model_type if index is not None else None
    rules = token_rules(config, lambda name: selector_for(name, model_type))
    if rules:
        translation.text += "\n".join(rules) + "\n"
    return translation


def _translate(
    config: dict,
    index: Optional[ModuleIndex] = None,
    *,
    source: str = "adapter_config.json",
    model: Optional[str] = None,
    layout: str = "per-expert",
) -> PeftTranslation:
    """The spec for a PEFT LoRA config; with a model index, its plan equals PEFT's choice on that model."""
    findings = unsupported(config)
    kind = adapter_kind(config)
    defaults_line = f"defaults {call(kind, defaults_arguments(config))}"
    try:
        rules, structural_findings = structural_rules(config, index)
    except NeedsModel as reason:
        if index is None:
            raise UserError(
                f"the PEFT config cannot be translated without the model: {reason}",
                help="pass --model MODEL to resolve it against the model's module names",
            ) from None
        rules, structural_findings = None, [note(f"{reason}: the spec names PEFT's choice of modules explicitly")]
    if index is None:
        findings += structural_findings + bias_findings(config, None)
        text = "\n".join(header(source, None, False) + as_comments(findings) + [defaults_line] + rules) + "\n"
        return PeftTranslation(text, findings, explicit=False)
    choice = peft_choice(config, index, layout)
    findings += (
        choice.findings + _fused_advice(config, index, choice) + bias_findings(config, _biased(config, index, choice))
    )
    if not choice.assignments:
        targets = config.get("target_modules")
        raise UserError(
            f"PEFT's config adapts no module of this model (target_modules is {shown(targets)})"
            + "".join(f"; {f.message}" for f in findings if f.lossy)[:400],
            help="name the modules in target_modules (PEFT's defaults per architecture are not read), and check that "
            "the adapter was made for this model",
        )
    defaults_lines, explicit = explicit_rules(choice.assignments, index)
    explicit_text = _compose(source, model, True, findings, defaults_lines, explicit)
    if rules is not None:
        rules, dropped = _drop_unmatched(rules, [defaults_line], index)
        structural_text = _compose(
            source, model, False, findings + structural_findings + dropped, [defaults_line], rules
        )
        if _same_plan(structural_text, explicit_text, index):
            return PeftTranslation(structural_text, findings + structural_findings + dropped, False, choice)
        findings.append(
            note(
                "the rule-for-rule translation does not select what PEFT selects on this model; "
                "the spec names the modules explicitly"
            )
        )
        explicit_text = _compose(source, model, True, findings, defaults_lines, explicit)
    else:
        findings += structural_findings
        explicit_text = _compose(source, model, True, findings, defaults_lines, explicit)
    return PeftTranslation(explicit_text, findings, True, choice)


def _biased(config: dict, index: ModuleIndex, choice: PeftChoice) -> list[str]:
    """The modules with a bias that PEFT's `bias` setting trains: all of them ("all"), or the adapted ones."""
    if config.get("bias") == "all":
        return [info.path for info in index if info.bias]
    return [path for path, a in choice.assignments.items() if a.kind != "full" and index[path].bias]


def _fused_advice(config: dict, index: ModuleIndex, choice: PeftChoice) -> list[Finding]:
    """A note when PEFT, on transformers 5's fused experts, adapts only the modules around them (the shared expert)
    while the same config on transformers 4's per-expert modules would have adapted the experts too."""
    if choice.layout != "target-parameters" or choice.fused or not any(i.family == "switch" for i in index):
        return []
    per_expert = peft_choice({k: v for k, v in config.items() if k != "target_parameters"}, index)
    missed = sorted(p for p in per_expert.assignments if index[p].family == "switch")
    if not missed:
        return []
    return [
        note(
            f"transformers 5 keeps the routed experts as fused parameters, which target_modules does not reach: PEFT "
            f"adapted only the modules around them (not '{missed[0]}'{' …' if len(missed) > 1 else ''}); to adapt the "
            "experts, train with target_parameters (experts.gate_up_proj, experts.down_proj), or import with "
            "--peft-layout per-expert if the adapter was made with transformers 4"
        )
    ]


def _compose(source, model, explicit, findings, defaults_lines, rules) -> str:
    return "\n".join(header(source, model, explicit) + as_comments(findings) + defaults_lines + rules) + "\n"


def _drop_unmatched(rules: list[str], defaults_lines: list[str], index: ModuleIndex) -> tuple[list[str], list[Finding]]:
    """Rules whose selector matches nothing in the model left out (PEFT ignores such names), with a note each."""
    from ..language.lint import check_text
    from ..model.selectors import SelectorMatcher

    kept, dropped = [], []
    for rule in rules:
        spec, _ = check_text("\n".join(defaults_lines + [rule]) + "\n")
        if spec is None or SelectorMatcher(spec.rules[0].selector).match(index).paths:
            kept.append(rule)
        else:
            dropped.append(note(f"'{rule}' matches no module of the model and was left out"))
    return kept, dropped


def _plan_key(text: str, index: ModuleIndex):
    from ..language.lint import check_text
    from ..model.plan import make_plan

    spec, _ = check_text(text)
    if spec is None:
        return None
    plan = make_plan(spec, index)
    if not plan.ok:
        return None
    return [(e.path, e.adapter, e.r, round(e.scale, 9) if e.scale else e.scale, e.dropout) for e in plan.entries]


def _same_plan(structural: str, explicit: str, index: ModuleIndex) -> bool:
    mine = _plan_key(structural, index)
    return mine is not None and mine == _plan_key(explicit, index)
