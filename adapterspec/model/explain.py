"""Why each module gets what it gets: the rule that decides it, the rules it overrides, and the rules that cannot apply.

Pure Python: works on a ModuleIndex read from a model directory, without mlx.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from ..errors import EXIT_ERRORS, UserError
from ..language import syntax as ast
from ..language.spec import Rule
from ..language.validate import describe_rows, training_text
from .index import ModuleIndex, ModuleInfo
from .plan import TYPE_FAMILIES, Plan, PlanEntry, passes_type_filter, receives
from .roles import ROLE_FILTERS
from .selectors import SelectorMatcher

DECIDES, OVERRIDDEN, CANNOT, MISSES = "decides", "overridden", "cannot apply", "does not match"


@dataclass(frozen=True)
class RuleVerdict:
    """What one rule has to do with one module, and why."""

    rule_index: int
    line: int
    rule: str
    status: str
    reason: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ModuleExplanation:
    path: str
    cls: str
    outcome: str
    entry: Optional[PlanEntry] = None
    verdicts: list[RuleVerdict] = field(default_factory=list)

    @property
    def deciding(self) -> Optional[RuleVerdict]:
        return next((v for v in self.verdicts if v.status == DECIDES), None)

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "class": self.cls,
            "outcome": self.outcome,
            "adapter": self.entry.to_json() if self.entry else None,
            "rules": [v.to_json() for v in self.verdicts],
        }


def _rule_text(rule: Rule) -> str:
    return f"{rule.text}: {rule.transform.describe()}"


def _without_indices(selector: ast.Selector) -> ast.Selector:
    segments = tuple(
        dataclasses.replace(s, index=ast.IndexAll(s.index.span)) if isinstance(s, ast.NameSegment) and s.index else s
        for s in selector.segments
    )
    return dataclasses.replace(selector, segments=segments)


class _RuleFacts:
    """One rule's matches on the index, computed once: direct matches, reach, and near misses."""

    def __init__(self, outcome, rules: list[Rule], index: ModuleIndex, errors: dict[int, str]):
        self.rule: Rule = outcome.rule
        self.rules = rules
        self.matched = set(outcome.matched)
        self.reached = set(outcome.reached)
        self.error = errors.get(self.rule.span.line)
        has_index = any(isinstance(s, ast.NameSegment) and s.index for s in self.rule.selector.segments)
        self.near = (
            set(SelectorMatcher(_without_indices(self.rule.selector)).match(index).paths) if has_index else set()
        )
        self.index = index

    def covering(self, path: str, paths: set[str]) -> Optional[str]:
        """`path` itself or its closest container among `paths`."""
        probe = path
        while probe:
            if probe in paths and (probe == path or self.index[probe].family in ("container", "list")):
                return probe
            probe = probe.rpartition(".")[0]
        return None

    def verdict(self, info: ModuleInfo, decider: Optional[int]) -> Optional[RuleVerdict]:
        rule = self.rule
        make = lambda status, reason: RuleVerdict(rule.index, rule.span.line, _rule_text(rule), status, reason)  # noqa: E731
        via = self.covering(info.path, self.matched)
        if via is None:
            near = self.covering(info.path, self.near)
            if near is None:
                return None
            return make(MISSES, f"the selector's list positions leave out '{near}'")
        how = "matches it" if via == info.path else f"matches its container '{via}'"
        if info.path in self.reached:
            if rule.index == decider:
                return make(DECIDES, f"{how}; the last rule that reaches it decides")
            later = f"line {self.rules[decider].span.line}" if decider is not None else "a later rule"
            return make(OVERRIDDEN, f"{how}, but {later} comes later and decides")
        if not receives(info, rule.transform.kind) and (via != info.path or rule.type_filter):
            return None  # a container's transform skips such modules silently, and so does a type filter
        return make(CANNOT, f"{how}, but " + self.why_not(info))

    def why_not(self, info: ModuleInfo) -> str:
        rule, kind = self.rule, self.rule.transform.kind
        if not receives(info, kind):
            if kind == "full":
                return f"{info.cls} has no parameters to train"
            if kind in ("lora", "dora"):
                return f"{kind} adapts Linear, SwitchLinear and Embedding layers, not {info.cls}"
            return f"{info.cls} is neither adaptable nor trainable"
        if not passes_type_filter(info, rule.type_filter, self.index):
            if rule.type_filter in ROLE_FILTERS:
                return f"its type filter @{rule.type_filter} takes the modules in that role, and this one is not"
            wanted = TYPE_FAMILIES.get(rule.type_filter, rule.type_filter)
            return f"its type filter @{rule.type_filter} takes {wanted} modules, not {info.cls}"
        if self.error:
            return f"the rule has an error on this model: {self.error}"
        return "the rule applies to none of its matches"


def explain(
    plan: Plan, index: ModuleIndex, paths: Optional[set[str]] = None, *, near_misses: bool = True
) -> list[ModuleExplanation]:
    """One explanation per module (those in `paths`, else every module some rule matches, and every adaptable one)."""
    errors = {d.span.line: d.message for d in plan.diagnostics if d.is_error and d.span}
    facts = [_RuleFacts(outcome, plan.spec.rules, index, errors) for outcome in plan.outcomes]
    decided = {path: outcome.rule.index for outcome in plan.outcomes for path in outcome.decided}
    entries = {e.path: e for e in plan.entries}
    out = []
    for info in index:
        if (paths is not None and info.path not in paths) or (
            info.family in ("container", "list") and not info.has_params
        ):
            continue
        decider = decided.get(info.path)
        verdicts = [v for f in facts if (v := f.verdict(info, decider)) is not None]
        if not near_misses:
            verdicts = [v for v in verdicts if v.status != MISSES]
        if paths is None and not info.adaptable and all(v.status == MISSES for v in verdicts):
            continue
        out.append(
            ModuleExplanation(info.path, info.cls, _outcome(info, decider, entries), entries.get(info.path), verdicts)
        )
    return out


def _outcome(info: ModuleInfo, decider: Optional[int], entries: dict) -> str:
    entry = entries.get(info.path)
    if entry is not None:
        training = training_text(entry.lr_scale, entry.loraplus, entry.weight_decay, entry.init)
        if entry.adapter == "full":
            return "full (its own parameters are trained" + training + ")"
        if entry.rows is not None:
            return f"{entry.adapter}(rows {describe_rows(entry.rows)}{training})"
        return (
            f"{entry.adapter}(r={entry.r}, scale={entry.scale:g}"
            + (f", dropout={entry.dropout:g}" if entry.dropout else "")
            + training
            + ")"
        )
    if decider is not None:
        return "none (a rule says so: stays frozen)"
    return "nothing (no rule reaches it: stays frozen)"


def marked_paths(rule: Rule, index: ModuleIndex) -> set[str]:
    """What a rule's selector marks in `tree`: without a type filter, the modules it matches; with one, the matched
    modules and the modules beneath matched containers that pass it."""
    marked = set()
    for path in SelectorMatcher(rule.selector).match(index).paths:
        if rule.type_filter is None:
            marked.add(path)
            continue
        info = index[path]
        reached = [info] + (index.descendants(path) if info.family in ("container", "list") else [])
        marked.update(m.path for m in reached if passes_type_filter(m, rule.type_filter, index))
    return marked


def selected_paths(selector_text: str, index: ModuleIndex) -> set[str]:
    """The modules a filter selects: a module path and everything beneath it, or what a selector marks in `tree`
    (everything beneath those too when it has no type filter, since a type filter has already looked beneath)."""
    if selector_text in index:
        return _with_descendants({selector_text}, index)
    rule = _filter_rule(selector_text)
    marked = marked_paths(rule, index)
    if not marked:
        raise UserError(
            f"'{selector_text}' matches 0 modules",
            help="run 'adapterspec tree MODEL SELECTOR' to see the module names and what the selector matches",
            exit_code=EXIT_ERRORS,
        )
    return marked if rule.type_filter else _with_descendants(marked, index)


def _filter_rule(selector_text: str) -> Rule:
    """A selector given on the command line, parsed by the spec grammar as the rule 'SELECTOR: none'."""
    from ..language.lint import check_text

    spec, diagnostics = check_text(f"{selector_text}: none\n", "<filter>")
    if spec is None:
        message = diagnostics[0].message if diagnostics else "not a selector"
        raise UserError(
            f"'{selector_text}' is neither a module path nor a selector: {message}",
            help="give a module path such as model.layers.0.self_attn.q_proj or a selector such as layers[0].mlp",
            exit_code=EXIT_ERRORS,
        )
    return spec.rules[0]


def _with_descendants(paths: set[str], index: ModuleIndex) -> set[str]:
    return paths | {m.path for path in paths for m in index.descendants(path)}


def render(explanations: list[ModuleExplanation], verbose: bool = False) -> str:
    lines = []
    for item in explanations:
        lines.append(f"{item.path} ({item.cls}): {item.outcome}")
        for v in item.verdicts:
            if v.status == MISSES and not verbose and item.deciding is not None:
                continue
            lines.append(f"  {v.status:>14}  line {v.line}: {v.rule}")
            lines.append(f"  {'':>14}  {v.reason}")
        if not item.verdicts:
            lines.append(f"  {'':>14}  no rule matches it")
    return "\n".join(lines)
