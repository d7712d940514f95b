"""Syntax tree → checked rules with resolved transforms (AS2xx), in plain Python so `lint` stays fast.

`spec.py` turns the result into the public pydantic `Spec`; both use the argument rules below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from difflib import get_close_matches
from typing import Any, Callable, Optional, Union

from . import syntax as ast
from .codes import diagnostic
from .diagnostics import Diagnostic, Span

SPEC_VERSION = 1
ADAPTER_KINDS = ("lora", "dora")
TRANSFORM_KINDS = ("lora", "dora", "full", "none")
ARGUMENT_NAMES = ("r", "scale", "alpha", "rslora", "dropout")
# what a module does, resolved per architecture by model/roles.py (@embedding is also a family)
ROLE_WORDS = ("experts", "shared_expert", "router", "attention", "mlp", "head", "embedding")
TYPE_WORDS = ("linear", "switch", "embedding") + tuple(w for w in ROLE_WORDS if w != "embedding")
BUILTIN_DEFAULTS = {"r": 8, "scale": 20.0, "dropout": 0.0}
MAX_RANK = 1 << 16

ARGUMENT_SYNONYMS = {
    "rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "p": "dropout", "use_rslora": "rslora", "rs_lora": "rslora", "lora_scale": "scale",
}  # fmt: skip
TRANSFORM_SYNONYMS = {
    "qlora": "lora", "use_dora": "dora", "freeze": "none", "frozen": "none", "skip": "none",
    "train": "full", "trainable": "full", "finetune": "full", "full_finetune": "full", "modules_to_save": "full",
}  # fmt: skip
TYPE_SYNONYMS = {
    "lin": "linear", "dense": "linear", "expert": "experts", "moe": "experts", "routers": "router",
    "gate": "router", "attn": "attention", "self_attn": "attention", "ffn": "mlp", "lm_head": "head",
    "embed": "embedding", "embeddings": "embedding", "emb": "embedding",
}  # fmt: skip

Value = Union[int, float, bool]


@dataclass(frozen=True)
class ArgumentRule:
    """What one argument accepts, and how to say so when it is wrong."""

    type: type
    type_text: str
    range_text: str
    help: str
    in_range: Callable[[Any], bool]

    def accepts_type(self, value: Any) -> bool:
        if isinstance(value, bool) or self.type is bool:
            return isinstance(value, bool) and self.type is bool
        return isinstance(value, int) if self.type is int else isinstance(value, (int, float))


ARGUMENTS = {
    "r": ArgumentRule(int, "r must be a whole number", f"r must be a whole number from 1 to {MAX_RANK}",
                      "for example r=8", lambda v: 1 <= v <= MAX_RANK),
    "scale": ArgumentRule(float, "scale must be a number", "scale must be a finite number", "for example scale=20.0",
                          math.isfinite),
    "alpha": ArgumentRule(float, "alpha must be a number", "alpha must be a finite number > 0",
                          "for example alpha=16 (scale becomes alpha / r)", lambda v: math.isfinite(v) and v > 0),
    "rslora": ArgumentRule(bool, "rslora must be true or false", "rslora must be true or false",
                           "write rslora=true or rslora=false", lambda v: True),
    "dropout": ArgumentRule(float, "dropout must be a number", "dropout must be at least 0 and below 1",
                            "for example dropout=0.05", lambda v: 0 <= v < 1),
}  # fmt: skip


def argument_problem(name: str, value: Any) -> Optional[tuple[str, str]]:
    """Why `value` is no valid `name`, as (code, text); None when it is valid."""
    rule = ARGUMENTS[name]
    if not rule.accepts_type(value):
        return "AS204", rule.type_text
    if not rule.in_range(value):
        return "AS205", rule.range_text
    return None


def argument_value(argument: ast.Argument) -> Any:
    """The Python value of an argument as written: numbers, `true`/`false`, or the bare word."""
    if argument.value in ("true", "false"):
        return argument.value == "true"
    if ARGUMENTS.get(argument.name) and ARGUMENTS[argument.name].type is float and isinstance(argument.value, int):
        try:
            return float(argument.value)
        except OverflowError:
            return math.inf if argument.value > 0 else -math.inf
    return argument.value


def describe_transform(kind: str, r, scale, alpha, rslora: bool, dropout) -> str:
    if kind not in ADAPTER_KINDS:
        return kind
    text = f"{kind}(r={r}, scale={scale:g}"
    if alpha is not None:
        text += f" [alpha={alpha:g}{', rslora' if rslora else ''}]"
    if dropout:
        text += f", dropout={dropout:g}"
    return text + ")"


class TransformBehaviour:
    """What a resolved transform can say of itself; shared by `ResolvedTransform` and `spec.Transform`."""

    kind: str
    r: Optional[int]
    scale: Optional[float]
    dropout: Optional[float]
    alpha: Optional[float]
    rslora: bool

    @property
    def adapts(self) -> bool:
        return self.kind in ADAPTER_KINDS

    def describe(self) -> str:
        return describe_transform(self.kind, self.r, self.scale, self.alpha, self.rslora, self.dropout)


@dataclass(frozen=True)
class ResolvedTransform(TransformBehaviour):
    """A rule's transform with defaults merged and alpha turned into scale (the fields of `spec.Transform`)."""

    kind: str
    r: Optional[int] = None
    scale: Optional[float] = None
    dropout: Optional[float] = None
    alpha: Optional[float] = None
    rslora: bool = False


def resolve(kind: str, defaults: Optional[dict[str, Value]], given: Optional[dict[str, Value]]) -> ResolvedTransform:
    """Built-in defaults, then the kind's defaults line, then the rule's own arguments, one by one.

    `scale` and `alpha` replace each other; `rslora` belongs to `alpha` and goes when `scale` comes.
    """
    if kind not in ADAPTER_KINDS:
        return ResolvedTransform(kind)
    merged: dict[str, Value] = dict(BUILTIN_DEFAULTS)
    for layer in (defaults, given):
        if not layer:
            continue
        if "scale" in layer:
            merged.pop("alpha", None)
            merged.pop("rslora", None)
        if "alpha" in layer:
            merged.pop("scale", None)
        merged.update(layer)
    r = int(merged["r"])
    alpha = merged.get("alpha")
    rslora = bool(merged.get("rslora", False))
    if alpha is not None:
        scale = float(alpha) / (math.sqrt(r) if rslora else r)
    else:
        scale = float(merged["scale"])
    return ResolvedTransform(kind, r, scale, float(merged["dropout"]), None if alpha is None else float(alpha), rslora)


@dataclass(frozen=True)
class CheckedRule:
    """One valid rule line (the fields of `spec.Rule`)."""

    index: int
    selector: ast.Selector
    type_filter: Optional[str]
    transform: ResolvedTransform
    span: Span
    transform_span: Span
    type_filter_span: Optional[Span] = None

    @property
    def text(self) -> str:
        return self.selector.text + (f"@{self.type_filter}" if self.type_filter else "")


@dataclass(frozen=True)
class CheckedSpec:
    """A spec without errors (the fields of `spec.Spec`); `defaults` maps a kind to its given arguments."""

    filename: str
    source: str
    version: int
    defaults: dict[str, dict[str, Value]]
    defaults_spans: dict[str, Span]
    rules: tuple[CheckedRule, ...]


def suggest(word: str, vocabulary, synonyms: Optional[dict[str, str]] = None) -> Optional[str]:
    lowered = word.lower()
    if synonyms and lowered in synonyms:
        return synonyms[lowered]
    if lowered in vocabulary:
        return lowered if lowered != word else None
    matches = get_close_matches(lowered, list(vocabulary), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _did_you_mean(word: str, vocabulary, synonyms=None) -> str:
    guess = suggest(word, vocabulary, synonyms)
    return f" (did you mean '{guess}'?)" if guess else ""


class _Validator:
    def __init__(self, tree: ast.SpecTree):
        self.tree = tree
        self.diagnostics: list[Diagnostic] = []

    def report(self, code: str, message: str, span: Optional[Span], help: Optional[str] = None, notes=()) -> None:
        self.diagnostics.append(diagnostic(code, message, span, help, self.tree.filename, notes))

    def run(self) -> Optional[CheckedSpec]:
        items = self.tree.items
        version = self.version_lines(items)
        defaults, defaults_spans = self.defaults_lines(items)
        rule_lines = [item for item in items if isinstance(item, ast.RuleLine)]
        rules: list[CheckedRule] = []
        for line in rule_lines:
            rule = self.rule(line, len(rules), defaults, defaults_spans)
            if rule is not None:
                rules.append(rule)
        if not rule_lines and not self.tree.failed_lines:
            self.report(
                "AS214",
                "the spec has no rules",
                Span(1, 1, 1, 1, 0, 0),
                "add a rule such as 'self_attn.<q,v>_proj: lora'",
            )
        if self.tree.failed_lines or any(d.is_error for d in self.diagnostics):
            return None
        return CheckedSpec(self.tree.filename, self.tree.source, version, defaults, defaults_spans, tuple(rules))

    def version_lines(self, items: list[ast.Item]) -> int:
        for position, item in enumerate(items):
            if not isinstance(item, ast.VersionLine):
                continue
            if position != 0:
                self.report(
                    "AS210",
                    "the version line must come before every other line",
                    item.span,
                    "move 'adapterspec 1' to the top (comments may precede it)",
                )
            elif item.version != SPEC_VERSION:
                self.report(
                    "AS210",
                    f"unsupported spec version {item.version}",
                    item.span,
                    f"this adapterspec reads 'adapterspec {SPEC_VERSION}'",
                )
        return SPEC_VERSION

    def defaults_lines(self, items: list[ast.Item]) -> tuple[dict[str, dict[str, Value]], dict[str, Span]]:
        defaults: dict[str, dict[str, Value]] = {}
        spans: dict[str, Span] = {}
        first_rule_seen = False
        for item in items:
            if isinstance(item, ast.RuleLine):
                first_rule_seen = True
            elif isinstance(item, ast.DefaultsLine):
                self.defaults_line(item, defaults, spans, first_rule_seen)
        return defaults, spans

    def defaults_line(self, item: ast.DefaultsLine, defaults, spans, after_rule: bool) -> None:
        call = item.transform
        kind = self.transform_kind(call)
        if kind is None:
            return
        if kind not in ADAPTER_KINDS:
            self.report(
                "AS212",
                f"'{kind}' takes no arguments, so it has no defaults",
                call.name_span,
                "defaults exist for lora and dora",
            )
            return
        if kind in spans:
            self.report(
                "AS211",
                f"a second 'defaults {kind}' line (the first is on line {spans[kind].line})",
                item.span,
                "merge both into one defaults line",
            )
            return
        spans[kind] = item.span
        if after_rule:
            self.report(
                "AS404",
                f"'defaults {kind}' comes after the first rule",
                item.span,
                "defaults apply to every rule of the file; move this line above the rules",
            )
        given = self.arguments(call, kind)
        if given is not None:
            defaults[kind] = given

    def transform_kind(self, call: ast.TransformCall) -> Optional[str]:
        if call.name in TRANSFORM_KINDS:
            return call.name
        self.report(
            "AS202",
            f"unknown transform '{call.name}'{_did_you_mean(call.name, TRANSFORM_KINDS, TRANSFORM_SYNONYMS)}",
            call.name_span,
            "a transform is one of lora, dora, full, none",
        )
        return None

    def arguments(self, call: ast.TransformCall, kind: str) -> Optional[dict[str, Value]]:
        """The arguments of one call by name; None when any of them is wrong (each one reported)."""
        if call.arguments is None:
            return {}
        if kind not in ADAPTER_KINDS:
            span = call.arguments[0].span if call.arguments else call.span
            self.report("AS208", f"'{kind}' takes no arguments", span, f"write '{kind}' alone")
            return None
        given: dict[str, Value] = {}
        seen: dict[str, ast.Argument] = {}
        ok = True
        for argument in call.arguments:
            if argument.name not in ARGUMENTS:
                self.report(
                    "AS201",
                    f"unknown argument '{argument.name}' for {kind}"
                    f"{_did_you_mean(argument.name, ARGUMENT_NAMES, ARGUMENT_SYNONYMS)}",
                    argument.name_span,
                    f"{kind} takes {', '.join(ARGUMENT_NAMES)}",
                )
                ok = False
                continue
            if argument.name in seen:
                self.report(
                    "AS209",
                    f"argument '{argument.name}' is given twice",
                    argument.name_span,
                    f"keep one '{argument.name}='",
                    (f"first given at column {seen[argument.name].span.column}",),
                )
                ok = False
                continue
            seen[argument.name] = argument
            value = argument_value(argument)
            problem = argument_problem(argument.name, value)
            if problem is not None:
                code, text = problem
                self.report(code, f"{text}, got {argument.raw}", argument.value_span, ARGUMENTS[argument.name].help)
                ok = False
                continue
            given[argument.name] = value
        if "scale" in given and "alpha" in given:
            self.report(
                "AS206",
                "give either scale or alpha, not both",
                seen["alpha"].span,
                "scale multiplies B·A directly; alpha sets scale = alpha / r",
            )
            ok = False
        return given if ok else None

    def rule(self, line: ast.RuleLine, index: int, defaults, defaults_spans) -> Optional[CheckedRule]:
        selector_ok = self.selector(line.selector)
        type_filter = self.type_filter(line.type_filter) if line.type_filter is not None else None
        type_ok = line.type_filter is None or type_filter is not None
        kind = self.transform_kind(line.transform)
        if kind is None:
            return None
        given = self.arguments(line.transform, kind)
        if given is None or not (selector_ok and type_ok):
            return None
        transform = resolve(kind, defaults.get(kind), given)
        if transform.rslora and transform.alpha is None:
            self.rslora_without_alpha(line.transform, kind, given, defaults_spans)
            return None
        return CheckedRule(
            index,
            line.selector,
            type_filter,
            transform,
            line.span,
            line.transform.span,
            line.type_filter.span if line.type_filter else None,
        )

    def rslora_without_alpha(self, call: ast.TransformCall, kind: str, given, defaults_spans) -> None:
        written = next((a for a in call.arguments or () if a.name == "rslora"), None)
        notes = () if written else (f"rslora=true comes from 'defaults {kind}' on line {defaults_spans[kind].line}",)
        self.report(
            "AS207",
            "rslora needs alpha",
            written.span if written else call.span,
            "add alpha=… (scale becomes alpha / sqrt(r))",
            notes,
        )

    def selector(self, selector: ast.Selector) -> bool:
        ok = True
        for segment in selector.segments:
            if isinstance(segment, ast.NameSegment) and isinstance(segment.index, ast.IndexSlice):
                if segment.index.step == 0:
                    self.report(
                        "AS213", "slice step cannot be zero", segment.index.span, "use [::1] or leave the step out"
                    )
                    ok = False
        return ok

    def type_filter(self, type_filter: ast.TypeFilter) -> Optional[str]:
        name = type_filter.name
        if name in TYPE_WORDS or name[:1].isupper():
            return name
        self.report(
            "AS203",
            f"unknown type filter '@{name}'{_did_you_mean(name, TYPE_WORDS, TYPE_SYNONYMS)}",
            type_filter.span,
            "use @linear, @switch, @embedding, a role (@experts, @shared_expert, @router, @attention, @mlp, "
            "@head), or an exact class name such as @QuantizedLinear",
        )
        return None


def check_tree(tree: ast.SpecTree) -> tuple[Optional[CheckedSpec], list[Diagnostic]]:
    """Validate a parsed file: the checked spec (None when anything is wrong) and every AS2xx diagnostic."""
    validator = _Validator(tree)
    checked = validator.run()
    return checked, validator.diagnostics
