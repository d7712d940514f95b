"""The validated spec as pydantic models: `LoraArguments`, `Transform`, `Rule`, `Spec` (AS2xx come from validate.py)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, InstanceOf, field_validator

from . import syntax as ast
from .diagnostics import Diagnostic, Span
from .validate import (
    SPEC_VERSION,
    CheckedSpec,
    TransformBehaviour,
    argument_problem,
    check_tree,
)
from .validate import resolve as _resolve


class LoraArguments(BaseModel):
    """The arguments written in one lora(...)/dora(...) call or defaults line; all optional."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    r: Optional[int] = None
    scale: Optional[float] = None
    alpha: Optional[float] = None
    rslora: Optional[bool] = None
    dropout: Optional[float] = None
    init: Optional[str] = None
    lr_scale: Optional[float] = None
    loraplus: Optional[float] = None
    weight_decay: Optional[float] = None

    @field_validator("*")
    @classmethod
    def _valid(cls, value: Any, info) -> Any:
        if value is not None:
            problem = argument_problem(info.field_name, value)
            if problem is not None:
                raise ValueError(problem[1])
        return value

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class Transform(TransformBehaviour, BaseModel):
    """A rule's transform with every argument resolved (defaults merged, alpha turned into scale)."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["lora", "dora", "tokens", "full", "none"]
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

    @field_validator("lr_scale", "loraplus", "weight_decay", "init", "rows")
    @classmethod
    def _valid(cls, value: Any, info) -> Any:
        if value is not None:
            problem = argument_problem(info.field_name, value)
            if problem is not None:
                raise ValueError(problem[1])
        return value


class Rule(BaseModel):
    """One `SELECTOR [@TYPE]: TRANSFORM` line, validated; `index` counts rules from 0 in file order."""

    model_config = ConfigDict(frozen=True)

    index: int
    selector: InstanceOf[ast.Selector]
    type_filter: Optional[str] = None
    transform: Transform
    span: InstanceOf[Span]
    transform_span: InstanceOf[Span]
    type_filter_span: Optional[InstanceOf[Span]] = None
    rows_span: Optional[InstanceOf[Span]] = None

    @property
    def text(self) -> str:
        return self.selector.text + (f"@{self.type_filter}" if self.type_filter else "")


class Spec(BaseModel):
    """A validated spec: its rules in file order (the last matching rule decides a module)."""

    model_config = ConfigDict(frozen=True)

    filename: str = "<spec>"
    source: str = ""
    version: int = SPEC_VERSION
    defaults: dict[str, LoraArguments] = Field(default_factory=dict)
    defaults_spans: dict[str, InstanceOf[Span]] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)


def resolve(kind: str, defaults: Optional[LoraArguments], arguments: Optional[LoraArguments]) -> Transform:
    """Merge built-in defaults, the kind's defaults and a rule's own arguments into a `Transform`."""
    resolved = _resolve(kind, defaults.given() if defaults else None, arguments.given() if arguments else None)
    return Transform(**vars(resolved))


def spec_from_checked(checked: CheckedSpec) -> Spec:
    """The public `Spec` of a checked spec (validate.py has already reported every problem)."""
    rules = [
        Rule(
            index=rule.index,
            selector=rule.selector,
            type_filter=rule.type_filter,
            transform=Transform(**vars(rule.transform)),
            span=rule.span,
            transform_span=rule.transform_span,
            type_filter_span=rule.type_filter_span,
            rows_span=rule.rows_span,
        )
        for rule in checked.rules
    ]
    return Spec(
        filename=checked.filename,
        source=checked.source,
        version=checked.version,
        defaults={kind: LoraArguments(**given) for kind, given in checked.defaults.items()},
        defaults_spans=dict(checked.defaults_spans),
        rules=rules,
    )


def validate(tree: ast.SpecTree) -> tuple[Optional[Spec], list[Diagnostic]]:
    """Syntax tree → `Spec` (None when it has errors) and every AS2xx diagnostic."""
    checked, diagnostics = check_tree(tree)
    return (spec_from_checked(checked) if checked is not None else None), diagnostics
