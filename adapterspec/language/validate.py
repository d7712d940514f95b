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
TRANSFORM_KINDS = ("lora", "dora", "tokens", "full", "none")
# the order `fmt` writes them in
ARGUMENT_NAMES = ("rows", "r", "scale", "alpha", "rslora", "dropout", "init", "lr_scale", "loraplus", "weight_decay")
LOW_RANK_ARGUMENTS = ("r", "scale", "alpha", "rslora", "dropout", "init", "lr_scale", "loraplus", "weight_decay")
# which arguments each transform takes (how its parameters train; `tokens` also which rows)
TRANSFORM_ARGUMENTS = {
    "lora": LOW_RANK_ARGUMENTS,
    "dora": LOW_RANK_ARGUMENTS,
    "tokens": ("rows", "lr_scale", "weight_decay"),
    "full": ("lr_scale", "weight_decay"),
    "none": (),
}
# mlx-lm's initialisation, PEFT's gaussian, and the two that move the principal part of W into the adapter
INITS = ("default", "gaussian", "pissa", "olora")
BASE_CHANGING_INITS = ("pissa", "olora")
MAX_ROWS = 1 << 20
# what a module does, resolved per architecture by model/roles.py (@embedding is also a family)
ROLE_WORDS = ("experts", "shared_expert", "router", "attention", "mlp", "head", "embedding")
TYPE_WORDS = ("linear", "switch", "embedding") + tuple(w for w in ROLE_WORDS if w != "embedding")
BUILTIN_DEFAULTS = {"r": 8, "scale": 20.0, "dropout": 0.0}
MAX_RANK = 1 << 16

ARGUMENT_SYNONYMS = {
    "rank": "r", "lora_r": "r", "lr": "lr_scale", "lr_ratio": "lr_scale", "loraplus_lr_ratio": "loraplus",
    "init_lora_weights": "init", "wd": "weight_decay", "trainable_token_indices": "rows", "indices": "rows", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "p": "dropout", "use_rslora": "rslora", "rs_lora": "rslora", "lora_scale": "scale",
}  # fmt: skip
TRANSFORM_SYNONYMS = {
    "qlora": "lora", "use_dora": "dora", "freeze": "none", "frozen": "none", "skip": "none",
    "trainable_tokens": "tokens", "token_rows": "tokens", "train": "full", "trainable": "full", "finetune": "full", "full_finetune": "full", "modules_to_save": "full",
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
        if self.type in (str, tuple):
            return isinstance(value, self.type)
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
    "init": ArgumentRule(str, "init must be a name", f"init must be one of {', '.join(INITS)}",
                         "for example init=pissa (see docs/training.md)", lambda v: v in INITS),
    "lr_scale": ArgumentRule(float, "lr_scale must be a number", "lr_scale must be a finite number > 0",
                             "for example lr_scale=0.1 (this rule's learning rate is 0.1 × the run's)",
                             lambda v: math.isfinite(v) and v > 0),
    "loraplus": ArgumentRule(float, "loraplus must be a number", "loraplus must be a finite number > 0",
                             "for example loraplus=16 (B learns 16 × as fast as A)",
                             lambda v: math.isfinite(v) and v > 0),
    "weight_decay": ArgumentRule(float, "weight_decay must be a number", "weight_decay must be a finite number ≥ 0",
                                 "for example weight_decay=0.01", lambda v: math.isfinite(v) and v >= 0),
    "rows": ArgumentRule(tuple, "rows must be a list of rows", f"rows must be distinct rows ≥ 0, at most {MAX_ROWS:,}",
                         "for example tokens([32000, 32001]) or tokens([32000:32008])", lambda v: rows_valid(v)),
}  # fmt: skip


def rows_valid(rows: tuple) -> bool:
    return (
        0 < len(rows) <= MAX_ROWS
        and all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in rows)
        and len(set(rows)) == len(rows)
    )


def expand_rows(rows: ast.RowList) -> tuple[Optional[tuple[int, ...]], Optional[str]]:
    """The rows a row list names, in the order written, or why it names none validly (an AS205 text)."""
    if not rows.ranges:
        return None, "the row list is empty"
    count = 0
    for start, stop in rows.ranges:
        if start < 0:
            return None, f"row {start} is negative"
        if stop <= start:
            return None, f"the range {start}:{stop} is empty (the stop is excluded, as in Python)"
        count += stop - start
        if count > MAX_ROWS:
            return None, f"the list names more than {MAX_ROWS:,} rows"
    expanded = tuple(row for start, stop in rows.ranges for row in range(start, stop))
    seen: set[int] = set()
    for row in expanded:
        if row in seen:
            return None, f"row {row} is listed twice"
        seen.add(row)
    return expanded, None


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
    if isinstance(argument.value, ast.RowList):
        return argument.value
    if ARGUMENTS.get(argument.name) and ARGUMENTS[argument.name].type is float and isinstance(argument.value, int):
        try:
            return float(argument.value)
        except OverflowError:
            return math.inf if argument.value > 0 else -math.inf
    return argument.value


def describe_rows(rows: tuple[int, ...]) -> str:
    """`[32000, 32001]`, or for long lists `[32000 … 32063] (64 rows)`."""
    if len(rows) <= 4:
        return "[" + ", ".join(str(r) for r in rows) + "]"
    return f"[{rows[0]} … {rows[-1]}] ({len(rows)} rows)"


def training_text(lr_scale: float, loraplus, weight_decay, init: str = "default") -> str:
    """`, init=pissa, lr×0.1, loraplus=16, weight_decay=0`: what a rule says beyond its adapter's shape."""
    parts = []
    if init != "default":
        parts.append(f"init={init}")
    if lr_scale != 1.0:
        parts.append(f"lr×{lr_scale:g}")
    if loraplus is not None:
        parts.append(f"loraplus={loraplus:g}")
    if weight_decay is not None:
        parts.append(f"weight_decay={weight_decay:g}")
    return "".join(", " + p for p in parts)


def describe_transform(
    kind: str, r, scale, alpha, rslora: bool, dropout, lr_scale=1.0, loraplus=None, weight_decay=None, init="default",
    rows=None,
) -> str:  # fmt: skip
    extra = training_text(lr_scale, loraplus, weight_decay, init)
    if kind == "tokens":
        return f"tokens({describe_rows(rows)}{extra})"
    if kind not in ADAPTER_KINDS:
        return f"{kind}({extra[2:]})" if extra else kind
    text = f"{kind}(r={r}, scale={scale:g}"
    if alpha is not None:
        text += f" [alpha={alpha:g}{', rslora' if rslora else ''}]"
    if dropout:
        text += f", dropout={dropout:g}"
    return text + extra + ")"


class TransformBehaviour:
    """What a resolved transform can say of itself; shared by `ResolvedTransform` and `spec.Transform`."""

    kind: str
    r: Optional[int]
    scale: Optional[float]
    dropout: Optional[float]
    alpha: Optional[float]
    rslora: bool
    lr_scale: float
    loraplus: Optional[float]
    weight_decay: Optional[float]
    init: str
    rows: Optional[tuple[int, ...]]

    @property
    def adapts(self) -> bool:
        return self.kind in ADAPTER_KINDS

    def describe(self) -> str:
        return describe_transform(
            self.kind, self.r, self.scale, self.alpha, self.rslora, self.dropout,
            self.lr_scale, self.loraplus, self.weight_decay, self.init, self.rows,
        )  # fmt: skip


@dataclass(frozen=True)
class ResolvedTransform(TransformBehaviour):
    """A rule's transform with defaults merged and alpha turned into scale (the fields of `spec.Transform`)."""

    kind: str
    r: Optional[int] = None
    scale: Optional[float] = None
    dropout: Optional[float] = None
    alpha: Optional[float] = None
    rslora: bool = False
    lr_scale: float = 1.0
    loraplus: Optional[float] = None
    weight_decay: Optional[float] = None
    init: str = "default"
    rows: Optional[tuple[int, ...]] = None


def resolve(kind: str, defaults: Optional[dict[str, Value]], given: Optional[dict[str, Value]]) -> ResolvedTransform:
    """Built-in defaults, then the kind's defaults line, then the rule's own arguments, one by one.

    `scale` and `alpha` replace each other; `rslora` belongs to `alpha` and goes when `scale` comes.
    """
    if kind not in ADAPTER_KINDS:
        own = given or {}
        return ResolvedTransform(
            kind,
            lr_scale=float(own.get("lr_scale", 1.0)),
            weight_decay=None if own.get("weight_decay") is None else float(own["weight_decay"]),
            rows=None if own.get("rows") is None else tuple(own["rows"]),
        )
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
    return ResolvedTransform(
        kind,
        r,
        scale,
        float(merged["dropout"]),
        None if alpha is None else float(alpha),
        rslora,
        lr_scale=float(merged.get("lr_scale", 1.0)),
        loraplus=None if merged.get("loraplus") is None else float(merged["loraplus"]),
        weight_decay=None if merged.get("weight_decay") is None else float(merged["weight_decay"]),
        init=str(merged.get("init", "default")),
    )


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
    rows_span: Optional[Span] = None

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
                f"'{kind}' takes no arguments, so it has no defaults"
                if kind == "none"
                else f"'{kind}' has no defaults line: give its arguments on each rule",
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
            "a transform is one of lora, dora, tokens, full, none",
        )
        return None

    def arguments(self, call: ast.TransformCall, kind: str) -> Optional[dict[str, Value]]:
        """The arguments of one call by name; None when any of them is wrong (each one reported)."""
        if call.arguments is None and kind != "tokens":
            return {}
        accepted = TRANSFORM_ARGUMENTS[kind]
        if not accepted and call.arguments is not None:
            span = call.arguments[0].span if call.arguments else call.span
            self.report("AS208", f"'{kind}' takes no arguments", span, f"write '{kind}' alone")
            return None
        given: dict[str, Value] = {}
        seen: dict[str, ast.Argument] = {}
        ok = True
        for argument in call.arguments or ():
            if argument.name not in ARGUMENTS:
                self.report(
                    "AS201",
                    f"unknown argument '{argument.name}' for {kind}"
                    f"{_did_you_mean(argument.name, accepted, ARGUMENT_SYNONYMS)}",
                    argument.name_span,
                    f"{kind} takes {', '.join(accepted)}",
                )
                ok = False
                continue
            if argument.name not in accepted:
                self.report(
                    "AS208",
                    f"'{kind}' does not take {'a row list' if argument.name == 'rows' else repr(argument.name)}",
                    argument.span,
                    f"{kind} takes {', '.join(accepted)}",
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
            if isinstance(value, ast.RowList) and argument.name == "rows":
                value, reason = expand_rows(value)
                if reason is not None:
                    self.report("AS205", reason, argument.value_span, ARGUMENTS["rows"].help)
                    ok = False
                    continue
            problem = argument_problem(argument.name, value)
            if problem is not None:
                code, text = problem
                self.report(code, f"{text}, got {argument.raw}", argument.value_span, ARGUMENTS[argument.name].help)
                ok = False
                continue
            given[argument.name] = value
        if kind == "tokens" and "rows" not in given and ok:
            self.report(
                "AS215",
                "tokens needs the rows to train",
                call.span,
                "list them first: tokens([32000, 32001]) or tokens([32000:32008])",
            )
            ok = False
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
            next((a.value_span for a in line.transform.arguments or () if a.name == "rows"), None),
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
