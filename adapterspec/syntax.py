"""The syntax tree of a spec file: plain dataclasses whose every node carries its source span."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from .diagnostics import Span


@dataclass(frozen=True)
class Literal:
    text: str
    span: Span


@dataclass(frozen=True)
class Star:
    span: Span


@dataclass(frozen=True)
class Alternation:
    options: tuple[tuple[Union[Literal, Star], ...], ...]
    span: Span


Piece = Union[Literal, Star, Alternation]


@dataclass(frozen=True)
class IndexAll:
    span: Span


@dataclass(frozen=True)
class IndexList:
    values: tuple[int, ...]
    span: Span


@dataclass(frozen=True)
class IndexSlice:
    start: int | None
    stop: int | None
    step: int | None
    span: Span


Index = Union[IndexAll, IndexList, IndexSlice]


@dataclass(frozen=True)
class DeepSegment:
    """`**`: zero or more path segments."""

    span: Span


@dataclass(frozen=True)
class NameSegment:
    """A segment pattern (`q_proj`, `*_proj`, `<q,v>_proj`, `*`), optionally indexed (`layers[-4:]`)."""

    pieces: tuple[Piece, ...]
    index: Index | None
    span: Span


Segment = Union[DeepSegment, NameSegment]


@dataclass(frozen=True)
class Selector:
    anchored: bool
    segments: tuple[Segment, ...]
    span: Span
    text: str


@dataclass(frozen=True)
class TypeFilter:
    name: str
    span: Span


@dataclass(frozen=True)
class Argument:
    name: str
    name_span: Span
    raw: str
    value: Union[int, float, str]
    value_span: Span
    span: Span


@dataclass(frozen=True)
class TransformCall:
    name: str
    name_span: Span
    arguments: tuple[Argument, ...] | None
    span: Span


@dataclass(frozen=True)
class VersionLine:
    version: int
    span: Span


@dataclass(frozen=True)
class DefaultsLine:
    transform: TransformCall
    span: Span


@dataclass(frozen=True)
class RuleLine:
    selector: Selector
    type_filter: TypeFilter | None
    transform: TransformCall
    span: Span


Item = Union[VersionLine, DefaultsLine, RuleLine]


@dataclass(frozen=True)
class Comment:
    text: str
    span: Span
    trailing: bool


@dataclass
class SpecTree:
    """A parsed file: its items in order, its comments, and the source it came from."""

    source: str
    filename: str
    items: list[Item] = field(default_factory=list)
    comments: list[Comment] = field(default_factory=list)
    blank_lines: list[int] = field(default_factory=list)
