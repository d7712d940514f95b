"""Spec × ModuleIndex → Plan: which module gets which adapter, decided by the last matching rule (AS3xx)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Optional, Union

from ..language.checks import overridden, overriding_rules
from ..language.codes import diagnostic
from ..language.diagnostics import Diagnostic, Span, SpecError, sort_key
from ..language.lint import parse_spec
from ..language.spec import Rule, Spec
from ..language.validate import BASE_CHANGING_INITS
from .families import unadaptable_reason
from .hf_moe import W123, expert_renames
from .index import ModuleIndex, ModuleInfo
from .kinds import kind_for
from .roles import ROLE_FILTERS, ROUTER_NAMES, roles, routed_experts, routers
from .selectors import SelectorMatcher, literal_names

# a Hugging Face per-expert module name in a selector: `.experts.3.up_proj`, `.experts.*.w1`, `.experts[0].w2`
BLOCK_HEAD = re.compile(r"^.*?layers(\[[^\]]*\]|\.\d+)")
HF_EXPERT_NAME = re.compile(r"\.experts(?:\.(?P<e1>\d+|\*)|\[(?P<e2>[^\]]*)\])\.(?P<proj>\w+)")
TYPE_FAMILIES = {"linear": "linear", "switch": "switch", "embedding": "embedding"}


@dataclass(frozen=True)
class PlanEntry:
    """One adapted (or fully trained) module."""

    path: str
    base: str
    adapter: str
    r: Optional[int]
    scale: Optional[float]
    dropout: Optional[float]
    trainable: int
    rule_index: int
    rule_span: Span
    # how the entry trains, and which rows a `tokens` entry holds (omitted from the JSON when at their defaults)
    lr_scale: float = 1.0
    loraplus: Optional[float] = None
    weight_decay: Optional[float] = None
    init: str = "default"
    rows: Optional[tuple[int, ...]] = None

    def training_json(self) -> dict:
        """The entry's training settings that differ from the run's (learning rate scale, LoRA+, decay, init)."""
        found = {
            "lr_scale": self.lr_scale if self.lr_scale != 1.0 else None,
            "loraplus": self.loraplus,
            "weight_decay": self.weight_decay,
            "init": self.init if self.init != "default" else None,
            "rows": list(self.rows) if self.rows is not None else None,
        }
        return {key: value for key, value in found.items() if value is not None}

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "base": self.base,
            "adapter": self.adapter,
            "r": self.r,
            "scale": self.scale,
            "dropout": self.dropout,
            "trainable": self.trainable,
            "rule": {"index": self.rule_index, "line": self.rule_span.line, "column": self.rule_span.column},
            **self.training_json(),
        }


@dataclass
class RuleOutcome:
    """What one rule matched, which modules it reached, and which of those it finally decides."""

    rule: Rule
    matched: list[str] = field(default_factory=list)
    reached: list[str] = field(default_factory=list)
    decided: list[str] = field(default_factory=list)


@dataclass
class Plan:
    spec: Spec
    entries: list[PlanEntry]
    total_parameters: int
    diagnostics: list[Diagnostic]
    outcomes: list[RuleOutcome] = field(default_factory=list)
    index: Optional[ModuleIndex] = None

    @property
    def trainable_parameters(self) -> int:
        return sum(e.trainable for e in self.entries)

    @property
    def ok(self) -> bool:
        return not any(d.is_error for d in self.diagnostics)

    def to_json(self) -> dict:
        return {
            "modules": [e.to_json() for e in self.entries],
            "trainable_parameters": self.trainable_parameters,
            "total_parameters": self.total_parameters,
            "diagnostics": [d.to_json() for d in self.diagnostics],
        }


def passes_type_filter(info: ModuleInfo, type_filter: Optional[str], index: Optional[ModuleIndex] = None) -> bool:
    """Whether a module passes a type filter: a family, a role of this architecture (needs the index), a class."""
    if type_filter is None:
        return True
    if type_filter in TYPE_FAMILIES:
        return info.family == TYPE_FAMILIES[type_filter]
    if type_filter in ROLE_FILTERS:
        return index is not None and info.path in roles(index)[type_filter]
    return info.cls == type_filter


def receives(info: ModuleInfo, kind: str) -> bool:
    """Whether a module can take a transform of this kind at all."""
    if kind in ("lora", "dora"):
        return info.adaptable
    if kind == "full":
        return info.num_params > 0
    if kind == "tokens":
        return info.family == "embedding"
    return info.adaptable or info.num_params > 0


class _Planner:
    def __init__(self, spec: Spec, index: ModuleIndex):
        self.spec = spec
        self.index = index
        self.diagnostics: list[Diagnostic] = []
        self._segment_names: Optional[list[str]] = None

    def report(self, code: str, message: str, span: Span, help: str | None = None, notes=()):
        self.diagnostics.append(diagnostic(code, message, span, help, self.spec.filename, notes))

    def check_experts(self, entries: list[PlanEntry], decisions: dict[str, int]) -> None:
        """AS309 when a mixture of experts gets adapters on its other linears but none on a routed expert;
        AS311 (info) for each rule that adapts a router."""
        experts = routed_experts(self.index)
        if not experts or not entries:
            return
        adapted = {e.path: e for e in entries}
        routing = set(routers(self.index, experts))
        for rule_index in sorted({adapted[p].rule_index for p in routing if p in adapted}):
            rule = self.spec.rules[rule_index]
            path = next(p for p in sorted(routing) if p in adapted and adapted[p].rule_index == rule_index)
            self.report(
                "AS311",
                f"'{path}' is a router of the mixture of experts: adapting it changes which experts each token uses",
                rule.selector.span,
                "that may be what you want; a rule that says 'none' for the routers leaves them as they are",
            )
        if any(p in decisions for p in experts):  # adapted, or left out on purpose by a rule that says so
            return
        others = [e for e in entries if self.index[e.path].family == "linear" and e.path not in routing]
        blocks = self.index.block_list
        in_blocks = [e for e in others if blocks is None or e.path.startswith(blocks + ".")]
        if not in_blocks:
            return
        rule = self.spec.rules[in_blocks[0].rule_index]
        self.report(
            "AS309",
            f"the model routes tokens to experts ({len(experts)} expert layers, e.g. '{experts[0]}') and this "
            "spec adapts its other linears but no expert",
            rule.selector.span,
            "add a rule for the experts (e.g. '**@experts: lora'), or one that says 'none' for them to mean it",
        )

    def segment_names(self) -> list[str]:
        if self._segment_names is None:
            self._segment_names = sorted({info.name for info in self.index})
        return self._segment_names

    def reach(self, rule: Rule, matched: list[str]) -> tuple[list[ModuleInfo], list[ModuleInfo]]:
        """Modules a rule hands its transform to, and the ones its type filter turned away."""
        kind = rule.transform.kind
        seen: set[str] = set()
        reached, filtered = [], []
        covered = None  # the last container handed down: matches beneath it add nothing (paths come in order)
        for path in matched:
            if covered is not None and path.startswith(covered):
                continue
            info = self.index[path]
            candidates = [info]
            if info.family in ("container", "list"):
                candidates += self.index.descendants(path)
                covered = path + "."
            for candidate in candidates:
                if candidate.path in seen or not receives(candidate, kind):
                    continue
                seen.add(candidate.path)
                if passes_type_filter(candidate, rule.type_filter, self.index):
                    reached.append(candidate)
                else:
                    filtered.append(candidate)
        return reached, filtered

    def out_of_range(self, rule: Rule, out_of_range) -> None:
        value, list_path, length = out_of_range[0]
        self.report(
            "AS305",
            f"index {value} is outside '{list_path}' ({length} elements)",
            rule.selector.span,
            f"valid positions are 0…{length - 1} or -{length}…-1",
        )

    def no_match(self, rule: Rule) -> None:
        selector = rule.selector
        help_text = "run 'adapterspec tree MODEL' to see the module names"
        stacked = self.stacked_expert_hint(selector.text)
        if stacked:
            self.report("AS301", f"'{selector.text}' matches no module of the model: {stacked[0]}", selector.span,
                        f"{stacked[1]}; {help_text}")  # fmt: skip
            return
        suggestions = []
        for name in literal_names(selector):
            if name not in self.segment_names():
                suggestions += get_close_matches(name, self.segment_names(), n=1, cutoff=0.6)
        if suggestions:
            help_text = f"did you mean '{suggestions[0]}'? " + help_text
        self.report("AS301", f"'{selector.text}' matches no module of the model", selector.span, help_text)

    def stacked_expert_hint(self, text: str) -> Optional[tuple[str, str]]:
        """(what happened, what to write) for a Hugging Face per-expert name (`mlp.experts.3.up_proj`,
        `block_sparse_moe.experts.*.w1`) on a model whose experts mlx-lm stacks into SwitchLinears."""
        pasted = HF_EXPERT_NAME.search(text)
        if not pasted:
            return None
        projection = expert_renames(self.index.model_type).get(pasted["proj"]) or W123.get(pasted["proj"])
        projection = projection or pasted["proj"]
        found = next((p for p in routed_experts(self.index) if p.endswith(f".{projection}")), None)
        if found is None or self.index[found].family != "switch":
            return None
        block = next((b for b in self.index.blocks if found.startswith(b + ".")), None)
        relative = found[len(block) + 1 :] if block else found
        head = BLOCK_HEAD.match(text)
        written = f"{head.group() if head else 'layers[*]'}.{relative}" if block else f"/{found}"
        number = pasted["e1"] or pasted["e2"] or ""
        expert = f"expert {number} of " if number.isdigit() else "these experts are in "
        return (
            f"mlx-lm stacks the experts into one SwitchLinear per projection; {expert}'{found}' "
            f"({self.index[found].cls}, {self.index[found].num_experts} experts)",
            f"write '{written}' (a rule adapts every expert of a switch layer), or '**@experts'",
        )

    def unadaptable_router(self) -> Optional[ModuleInfo]:
        """A mixture's router that is no Linear (deepseek's MoEGate): named like a router, beside routed experts."""
        holders = {e.rsplit(".", 2)[0] for e in routed_experts(self.index)}
        return next(
            (
                info
                for info in self.index
                if not info.adaptable and info.name in ROUTER_NAMES and info.parent in holders and info.has_params
            ),
            None,
        )

    def cannot_adapt(self, rule: Rule, matched: list[str], filtered: list[ModuleInfo]) -> None:
        kind = rule.transform.kind
        if filtered:
            example = filtered[0]
            help_text = f"it matches e.g. '{example.path}' ({example.cls}); change or drop the type filter"
            gate = self.unadaptable_router() if rule.type_filter == "router" else None
            if gate is not None:
                help_text = (
                    f"this model's router '{gate.path}' holds its weight itself (no Linear) and takes no adapter; "
                    "leave the routers out"
                )
            self.report(
                "AS304",
                f"no module matched by '{rule.selector.text}' is of type @{rule.type_filter}",
                rule.type_filter_span or rule.selector.span,
                help_text,
            )
            return
        example = self.index[matched[0]]
        if kind == "full":
            message = (
                f"'{rule.selector.text}' matches only modules without parameters, e.g. '{example.path}' ({example.cls})"
            )
            help_text = "full trains a module's own parameters; select modules that have some"
        else:
            message = f"{kind} cannot adapt '{example.path}' ({example.cls})"
            if len(matched) > 1:
                message += f" or the {len(matched) - 1} other module(s) it matches"
            help_text = "lora and dora adapt Linear, SwitchLinear and Embedding layers (quantized too); use 'full' to train norms"
        self.report("AS302", message, rule.selector.span, help_text)

    def check_reached(self, rule: Rule, reached: list[ModuleInfo]) -> bool:
        kind = rule.transform.kind
        if kind == "full":
            quantized = [m for m in reached if m.quantized]
            if quantized:
                self.report(
                    "AS310",
                    f"full cannot train the quantized weights of '{quantized[0].path}' ({quantized[0].cls})",
                    rule.transform_span,
                    "use lora on quantized layers, or dequantize the model first",
                )
                return False
        if not self.check_training(rule, reached):
            return False
        if rule.transform.adapts:
            r = rule.transform.r
            too_wide = [m for m in reached if r >= min(m.input_dims or r + 1, m.output_dims or r + 1)]
            if too_wide:
                m = too_wide[0]
                self.report(
                    "AS306",
                    f"r={r} is not below min(in, out) = {min(m.input_dims, m.output_dims)} of '{m.path}'",
                    rule.transform_span,
                    "a low-rank adapter at full rank costs more than training the layer",
                )
        return True

    def check_training(self, rule: Rule, reached: list[ModuleInfo]) -> bool:
        """AS312 for token rows past the embedding; AS313/AS314 where `tokens` or a base-changing init cannot go."""
        transform = rule.transform
        rewrites = transform.kind == "tokens" or transform.init in BASE_CHANGING_INITS
        quantized = [m for m in reached if m.quantized] if rewrites else []
        if quantized:
            what = "tokens" if transform.kind == "tokens" else f"init={transform.init}"
            self.report(
                "AS313",
                f"{what} cannot rewrite the quantized weights of '{quantized[0].path}' ({quantized[0].cls})",
                rule.rows_span or rule.transform_span,
                "tokens and pissa/olora change the base weights, which a quantized layer cannot hold exactly; "
                "use init=default or gaussian, or dequantize the model first",
            )
            return False
        if transform.init in BASE_CHANGING_INITS and transform.scale <= 0:
            self.report(
                "AS314",
                f"init={transform.init} needs a positive scale, got {transform.scale:g}",
                rule.transform_span,
                "the principal part moves into the adapter as scale·B·A; give scale > 0 (or alpha)",
            )
            return False
        if transform.init in BASE_CHANGING_INITS:
            other = [m for m in reached if transform.kind != "lora" or m.family != "linear"]
            if other:
                self.report(
                    "AS314",
                    f"init={transform.init} cannot initialise {transform.kind} on '{other[0].path}' ({other[0].cls})",
                    rule.transform_span,
                    f"{transform.init} takes the principal part of a Linear layer's weight; "
                    "add @linear, or use init=default or gaussian here",
                )
                return False
        if transform.kind == "tokens":
            for module in reached:
                past = [row for row in transform.rows if row >= (module.input_dims or 0)]
                if past:
                    self.report(
                        "AS312",
                        f"row {past[0]} is outside '{module.path}' ({module.input_dims} rows)",
                        rule.rows_span or rule.transform_span,
                        f"rows go from 0 to {(module.input_dims or 1) - 1}; add the new tokens to the "
                        "vocabulary (and resize the embedding) first",
                    )
                    return False
        return True

    def check_prefixes(self, rule: Rule, prefixes: dict[str, str]) -> None:
        from ..language import syntax as ast

        segments = rule.selector.segments
        if rule.selector.anchored or (segments and isinstance(segments[0], ast.DeepSegment)):
            return
        tops: dict[str, str] = {}
        for prefix in prefixes.values():
            if prefix:
                tops.setdefault(prefix.split(".", 1)[0], prefix)
        if len(tops) > 1:
            first, second = list(tops.values())[:2]
            self.report(
                "AS307",
                f"'{rule.selector.text}' matches under two different prefixes: '{first}' and '{second}'",
                rule.selector.span,
                f"anchor it to pick one, e.g. '/{first}.{rule.selector.text}'",
            )

    def run(self) -> Plan:
        decisions: dict[str, int] = {}
        outcomes: list[RuleOutcome] = []
        for rule in self.spec.rules:
            outcome = RuleOutcome(rule)
            outcomes.append(outcome)
            result = SelectorMatcher(rule.selector).match(self.index)
            outcome.matched = result.paths
            if result.out_of_range:
                self.out_of_range(rule, result.out_of_range)
            if not result.paths:
                if not result.out_of_range:
                    self.no_match(rule)
                continue
            self.check_prefixes(rule, result.prefixes)
            reached, filtered = self.reach(rule, result.paths)
            if not reached:
                self.cannot_adapt(rule, result.paths, filtered)
                continue
            if not self.check_reached(rule, reached):
                continue
            outcome.reached = [m.path for m in reached]
            for module in reached:
                decisions[module.path] = rule.index
        entries = []
        tied_rules: set[int] = set()
        refused_rules: set[int] = set()
        for path in self.index.modules:
            if path not in decisions:
                continue
            rule = self.spec.rules[decisions[path]]
            outcomes[rule.index].decided.append(path)
            transform = rule.transform
            if transform.kind == "none":
                continue
            info = self.index[path]
            training = {
                "lr_scale": transform.lr_scale,
                "loraplus": transform.loraplus,
                "weight_decay": transform.weight_decay,
                "init": transform.init,
                "rows": transform.rows,
            }
            if transform.kind == "full":
                entries.append(
                    PlanEntry(
                        path, info.cls, "full", None, None, None, info.num_params, rule.index, rule.span, **training
                    )
                )
                continue
            reason = unadaptable_reason(info.cls)
            if reason:
                if rule.index not in refused_rules:
                    refused_rules.add(rule.index)
                    self.report(
                        "AS315",
                        f"'{path}' is a {info.cls}, which cannot take an adapter: {reason}",
                        rule.selector.span,
                        f"leave it out, e.g. with a later rule '**@{info.cls}: none'",
                    )
                continue
            kind = kind_for(transform.kind, info.family)
            if transform.kind == "tokens":
                entries.append(
                    PlanEntry(
                        path,
                        info.cls,
                        kind.name,
                        None,
                        None,
                        None,
                        kind.parameters(info.input_dims or 0, info.output_dims or 0, len(transform.rows)),
                        rule.index,
                        rule.span,
                        **training,
                    )
                )
                if self.index.tied_embeddings:
                    tied_rules.add(rule.index)
                continue
            trainable = kind.parameters(info.input_dims or 0, info.output_dims or 0, transform.r, info.num_experts)
            entries.append(
                PlanEntry(
                    path,
                    info.cls,
                    kind.name,
                    transform.r,
                    transform.scale,
                    transform.dropout,
                    trainable,
                    rule.index,
                    rule.span,
                    **training,
                )
            )
            if info.family == "embedding" and self.index.tied_embeddings:
                tied_rules.add(rule.index)
        for rule_index in sorted(tied_rules):
            rule = self.spec.rules[rule_index]
            self.report(
                "AS308",
                "the embedding is tied to the output head: this adapter changes the output layer too",
                rule.selector.span,
                "that is usually what you want; select @linear modules only to leave it out",
            )
        self.check_experts(entries, decisions)
        statically_overridden = overriding_rules(self.spec)
        for outcome in outcomes:
            if outcome.reached and not outcome.decided and outcome.rule.index not in statically_overridden:
                later = self.spec.rules[decisions[outcome.reached[0]]]
                self.diagnostics.append(overridden(outcome.rule, later, self.spec.filename, outcome.reached[0]))
        self.diagnostics.sort(key=sort_key)
        return Plan(self.spec, entries, self.index.total_params, self.diagnostics, outcomes, self.index)


def make_plan(spec: Spec, index: ModuleIndex) -> Plan:
    """Match every rule of the spec against the model's modules and resolve what each module gets."""
    return _Planner(spec, index).run()


def plan_spec(spec: Union[Spec, str], index: ModuleIndex, filename: str = "<spec>") -> Plan:
    """The plan of a spec (a Spec, or its text) on a model; SpecError with every diagnostic when either has errors."""
    if isinstance(spec, str):
        spec = parse_spec(spec, filename)
    plan = make_plan(spec, index)
    if not plan.ok:
        raise SpecError(plan.diagnostics, spec.source)
    return plan
