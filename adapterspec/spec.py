"""Syntax tree → validated `Spec` (pydantic): transforms, arguments, defaults, type filters (AS2xx)."""

from __future__ import annotations

import math
from difflib import get_close_matches
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import syntax as ast
from .diagnostics import Diagnostic, Severity, Span

SPEC_VERSION = 1
ADAPTER_KINDS = ("lora", "dora")
TRANSFORM_KINDS = ("lora", "dora", "full", "none")
ARGUMENT_NAMES = ("r", "scale", "alpha", "rslora", "dropout")
TYPE_WORDS = ("linear", "switch", "embedding")
BUILTIN_DEFAULTS = {"r": 8, "scale": 20.0, "dropout": 0.0}

ARGUMENT_SYNONYMS = {
    "rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "p": "dropout", "use_rslora": "rslora", "rs_lora": "rslora", "lora_scale": "scale",
}
TRANSFORM_SYNONYMS = {
    "qlora": "lora", "lora_": "lora", "use_dora": "dora", "freeze": "none", "frozen": "none", "skip": "none",
    "train": "full", "trainable": "full", "finetune": "full", "full_finetune": "full", "modules_to_save": "full",
}
TYPE_SYNONYMS = {
    "lin": "linear", "dense": "linear", "experts": "switch", "expert": "switch", "moe": "switch",
    "embed": "embedding", "embeddings": "embedding", "emb": "embedding",
}


class LoraArguments(BaseModel):
    """The arguments a user wrote in one lora(...)/dora(...) call or defaults line; all optional."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    r: Optional[int] = Field(None, ge=1)
    scale: Optional[float] = None
    alpha: Optional[float] = Field(None, gt=0)
    rslora: Optional[bool] = None
    dropout: Optional[float] = Field(None, ge=0, lt=1)

    @field_validator("scale", "alpha")
    @classmethod
    def _finite(cls, value: Optional[float]) -> Optional[float]:
        if value is not None and not math.isfinite(value):
            raise ValueError("not finite")
        return value

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class Transform(BaseModel):
    """A rule's transform with every argument resolved (defaults merged, alpha turned into scale)."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["lora", "dora", "full", "none"]
    r: Optional[int] = None
    scale: Optional[float] = None
    dropout: Optional[float] = None
    alpha: Optional[float] = None
    rslora: bool = False

    @property
    def adapts(self) -> bool:
        return self.kind in ADAPTER_KINDS

    def describe(self) -> str:
        if not self.adapts:
            return self.kind
        text = f"{self.kind}(r={self.r}, scale={self.scale:g}"
        if self.alpha is not None:
            text += f" [alpha={self.alpha:g}{', rslora' if self.rslora else ''}]"
        if self.dropout:
            text += f", dropout={self.dropout:g}"
        return text + ")"


class Rule(BaseModel):
    """One `SELECTOR [@TYPE]: TRANSFORM` line, validated."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    index: int
    selector: ast.Selector
    type_filter: Optional[str] = None
    transform: Transform
    span: Span
    transform_span: Span
    type_filter_span: Optional[Span] = None

    @property
    def text(self) -> str:
        return self.selector.text + (f"@{self.type_filter}" if self.type_filter else "")


class Spec(BaseModel):
    """A validated spec: its rules in file order (the last matching rule decides a module)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    filename: str = "<spec>"
    source: str = ""
    version: int = SPEC_VERSION
    defaults: dict[str, LoraArguments] = Field(default_factory=dict)
    defaults_spans: dict[str, Span] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)


def suggest(word: str, vocabulary, synonyms: dict[str, str] | None = None) -> Optional[str]:
    lowered = word.lower()
    if synonyms and lowered in synonyms:
        return synonyms[lowered]
    if lowered in vocabulary and lowered != word:
        return lowered
    matches = get_close_matches(lowered, list(vocabulary), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _did_you_mean(word: str, vocabulary, synonyms=None) -> str:
    guess = suggest(word, vocabulary, synonyms)
    return f" (did you mean '{guess}'?)" if guess else ""


RANGE_TEXT = {
    "r": "r must be a whole number ≥ 1",
    "alpha": "alpha must be a finite number > 0",
    "scale": "scale must be a finite number",
    "dropout": "dropout must be at least 0 and below 1",
    "rslora": "rslora must be true or false",
}
TYPE_TEXT = {
    "r": "r must be a whole number",
    "alpha": "alpha must be a number",
    "scale": "scale must be a number",
    "dropout": "dropout must be a number",
    "rslora": "rslora must be true or false",
}


class _Validator:
    def __init__(self, tree: ast.SpecTree):
        self.tree = tree
        self.filename = tree.filename
        self.diagnostics: list[Diagnostic] = []

    def error(self, code: str, message: str, span: Span | None, help: str | None = None) -> None:
        self.diagnostics.append(Diagnostic(code, Severity.ERROR, message, span, help, self.filename))

    def warning(self, code: str, message: str, span: Span | None, help: str | None = None) -> None:
        self.diagnostics.append(Diagnostic(code, Severity.WARNING, message, span, help, self.filename))

    def transform_kind(self, call: ast.TransformCall) -> Optional[str]:
        if call.name in TRANSFORM_KINDS:
            return call.name
        self.error(
            "AS202",
            f"unknown transform '{call.name}'{_did_you_mean(call.name, TRANSFORM_KINDS, TRANSFORM_SYNONYMS)}",
            call.name_span,
            "a transform is one of lora, dora, full, none",
        )
        return None

    def arguments(self, call: ast.TransformCall, kind: str) -> Optional[LoraArguments]:
        """Validate one call's arguments; None when any of them is wrong (already reported)."""
        if call.arguments is None:
            return LoraArguments()
        if kind not in ADAPTER_KINDS:
            if call.arguments or call.arguments == ():
                span = call.arguments[0].span if call.arguments else call.span
                self.error("AS208", f"'{kind}' takes no arguments", span, f"write '{kind}' alone")
            return None
        values: dict[str, Any] = {}
        spans: dict[str, ast.Argument] = {}
        ok = True
        for argument in call.arguments:
            if argument.name not in ARGUMENT_NAMES:
                self.error(
                    "AS201",
                    f"unknown argument '{argument.name}' for {kind}"
                    f"{_did_you_mean(argument.name, ARGUMENT_NAMES, ARGUMENT_SYNONYMS)}",
                    argument.name_span,
                    f"{kind} takes r, scale, alpha, rslora, dropout",
                )
                ok = False
                continue
            if argument.name in spans:
                self.error("AS209", f"argument '{argument.name}' is given twice", argument.name_span,
                           f"keep one '{argument.name}='")
                ok = False
                continue
            spans[argument.name] = argument
            value = argument.value
            if value in ("true", "false"):
                value = value == "true"
            values[argument.name] = value
        try:
            arguments = LoraArguments(**values)
        except ValidationError as error:
            for problem in error.errors():
                name = str(problem["loc"][0])
                argument = spans[name]
                in_range = problem["type"] in ("greater_than", "greater_than_equal", "less_than", "value_error")
                text = RANGE_TEXT[name] if in_range else TYPE_TEXT[name]
                code = "AS205" if in_range else "AS204"
                self.error(code, f"{text}, got {argument.raw}", argument.value_span, _value_help(name))
            return None
        if arguments.scale is not None and arguments.alpha is not None:
            self.error("AS206", "give either scale or alpha, not both", spans["alpha"].span,
                       "scale multiplies B·A directly; alpha sets scale = alpha / r")
            ok = False
        return arguments if ok else None

    def run(self) -> Optional[Spec]:
        items = self.tree.items
        version = SPEC_VERSION
        defaults: dict[str, LoraArguments] = {}
        defaults_spans: dict[str, Span] = {}
        first_rule_seen = False
        for position, item in enumerate(items):
            if isinstance(item, ast.VersionLine):
                if position != 0:
                    self.error("AS210", "the version line must be the first line of the spec", item.span,
                               "move 'adapterspec 1' to the top (comments may precede it)")
                elif item.version != SPEC_VERSION:
                    self.error("AS210", f"unsupported spec version {item.version}", item.span,
                               f"this adapterspec reads 'adapterspec {SPEC_VERSION}'")
                version = item.version if position == 0 else version
            elif isinstance(item, ast.DefaultsLine):
                self.defaults_line(item, defaults, defaults_spans, first_rule_seen)
            else:
                first_rule_seen = True
        rules: list[Rule] = []
        for item in items:
            if isinstance(item, ast.RuleLine):
                rule = self.rule(item, len(rules), defaults)
                if rule is not None:
                    rules.append(rule)
        has_rule_lines = any(isinstance(item, ast.RuleLine) for item in items)
        if not has_rule_lines and not any(d.is_error for d in self.diagnostics):
            self.error("AS214", "the spec has no rules", Span(1, 1, 1, 1, 0, 0),
                       "add a rule such as 'self_attn.<q,v>_proj: lora'")
        if any(d.is_error for d in self.diagnostics):
            return None
        return Spec(
            filename=self.filename,
            source=self.tree.source,
            version=version,
            defaults=defaults,
            defaults_spans=defaults_spans,
            rules=rules,
        )

    def defaults_line(self, item: ast.DefaultsLine, defaults, defaults_spans, after_rule: bool) -> None:
        call = item.transform
        kind = self.transform_kind(call)
        if kind is None:
            return
        if kind not in ADAPTER_KINDS:
            self.error("AS212", f"'{kind}' takes no arguments, so it has no defaults", call.name_span,
                       "defaults exist for lora and dora")
            return
        if kind in defaults_spans:
            first = defaults_spans[kind]
            self.error("AS211", f"a second 'defaults {kind}' line (the first is on line {first.line})", item.span,
                       "merge both into one defaults line")
            return
        defaults_spans[kind] = item.span
        if after_rule:
            self.warning("AS404", f"'defaults {kind}' comes after the first rule", item.span,
                         "defaults apply to every rule of the file; move this line above the rules")
        arguments = self.arguments(call, kind)
        if arguments is not None:
            defaults[kind] = arguments

    def rule(self, item: ast.RuleLine, index: int, defaults: dict[str, LoraArguments]) -> Optional[Rule]:
        ok = self.selector(item.selector)
        type_filter = None
        if item.type_filter is not None:
            type_filter = self.type_filter(item.type_filter)
            ok = ok and type_filter is not None
        kind = self.transform_kind(item.transform)
        if kind is None:
            return None
        arguments = self.arguments(item.transform, kind)
        if arguments is None and kind in ADAPTER_KINDS:
            return None
        if not ok:
            return None
        transform = resolve(kind, defaults.get(kind), arguments)
        if transform.rslora and transform.alpha is None:
            span = next(a.span for a in item.transform.arguments or () if a.name == "rslora") \
                if any(a.name == "rslora" for a in item.transform.arguments or ()) else item.transform.span
            self.error("AS207", "rslora needs alpha", span, "add alpha=… (scale becomes alpha / sqrt(r))")
            return None
        return Rule(
            index=index,
            selector=item.selector,
            type_filter=type_filter,
            transform=transform,
            span=item.span,
            transform_span=item.transform.span,
            type_filter_span=item.type_filter.span if item.type_filter else None,
        )

    def selector(self, selector: ast.Selector) -> bool:
        ok = True
        for segment in selector.segments:
            if isinstance(segment, ast.NameSegment) and isinstance(segment.index, ast.IndexSlice):
                if segment.index.step == 0:
                    self.error("AS213", "slice step cannot be zero", segment.index.span, "use [::1] or leave the step out")
                    ok = False
        return ok

    def type_filter(self, type_filter: ast.TypeFilter) -> Optional[str]:
        name = type_filter.name
        if name in TYPE_WORDS or name[:1].isupper():
            return name
        self.error(
            "AS203",
            f"unknown type filter '@{name}'{_did_you_mean(name, TYPE_WORDS, TYPE_SYNONYMS)}",
            type_filter.span,
            "use @linear, @switch, @embedding, or an exact class name such as @QuantizedLinear",
        )
        return None


def _value_help(name: str) -> str:
    return {
        "r": "for example r=8",
        "alpha": "for example alpha=16 (scale becomes alpha / r)",
        "scale": "for example scale=20.0",
        "dropout": "for example dropout=0.05",
        "rslora": "write rslora=true or rslora=false",
    }[name]


def resolve(kind: str, defaults: Optional[LoraArguments], arguments: Optional[LoraArguments]) -> Transform:
    """Merge built-in defaults, the kind's defaults line and the rule's own arguments, one by one."""
    if kind not in ADAPTER_KINDS:
        return Transform(kind=kind)
    merged: dict[str, Any] = dict(BUILTIN_DEFAULTS)
    for layer in (defaults, arguments):
        if layer is None:
            continue
        given = layer.given()
        if "scale" in given:
            merged.pop("alpha", None)
            merged.pop("rslora", None)
        if "alpha" in given:
            merged.pop("scale", None)
        merged.update(given)
    r = merged["r"]
    alpha = merged.get("alpha")
    rslora = bool(merged.get("rslora", False))
    if alpha is not None:
        scale = alpha / math.sqrt(r) if rslora else alpha / r
    else:
        scale = float(merged["scale"])
    return Transform(kind=kind, r=r, scale=scale, dropout=float(merged["dropout"]), alpha=alpha, rslora=rslora)


def validate(tree: ast.SpecTree) -> tuple[Optional[Spec], list[Diagnostic]]:
    validator = _Validator(tree)
    spec = validator.run()
    return spec, validator.diagnostics
