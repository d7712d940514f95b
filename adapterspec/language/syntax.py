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
    """A dotted path pattern; `text` is its canonical spelling (see `selector_text`)."""

    anchored: bool
    segments: tuple[Segment, ...]
    span: Span
    text: str


@dataclass(frozen=True)
class TypeFilter:
    name: str
    span: Span


@dataclass(frozen=True)
class RowList:
    """`[32000, 32001, 32005:32008]`: rows of an embedding, each item a half-open range (a single row is i:i+1)."""

    ranges: tuple[tuple[int, int], ...]

    @property
    def text(self) -> str:
        return "[" + ", ".join(str(a) if b == a + 1 else f"{a}:{b}" for a, b in self.ranges) + "]"


@dataclass(frozen=True)
class Argument:
    """`name=value`; a row list written without a name (`tokens([1, 2])`) is the argument `rows`."""

    name: str
    name_span: Span
    raw: str
    value: Union[int, float, str, RowList]
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
    """A parsed file: its items in order, its comments, and the source it came from.

    `failed_lines` are the lines that did not parse (each has an AS1xx diagnostic).
    """

    source: str
    filename: str
    items: list[Item] = field(default_factory=list)
    comments: list[Comment] = field(default_factory=list)
    blank_lines: list[int] = field(default_factory=list)
    failed_lines: list[int] = field(default_factory=list)


def _piece_text(piece: Piece) -> str:
    if isinstance(piece, Literal):
        return piece.text
    if isinstance(piece, Star):
        return "*"
    return "<" + ",".join("".join(_piece_text(part) for part in option) for option in piece.options) + ">"


def _bound(value: int | None) -> str:
    return "" if value is None else str(value)


def index_text(index: Index) -> str:
    if isinstance(index, IndexAll):
        return "[*]"
    if isinstance(index, IndexList):
        return "[" + ",".join(str(value) for value in index.values) + "]"
    body = f"{_bound(index.start)}:{_bound(index.stop)}"
    if index.step is not None:
        body += f":{index.step}"
    return f"[{body}]"


def segment_text(segment: Segment) -> str:
    if isinstance(segment, DeepSegment):
        return "**"
    text = "".join(_piece_text(piece) for piece in segment.pieces)
    return text + (index_text(segment.index) if segment.index is not None else "")


def selector_text(anchored: bool, segments: tuple[Segment, ...]) -> str:
    """The canonical spelling of a selector: no spaces, `<a,b>`, `[0,5,9]`, `[-4:]`, `[::2]`."""
    return ("/" if anchored else "") + ".".join(segment_text(segment) for segment in segments)


def argument_text(argument: Argument) -> str:
    if argument.name == "rows":
        return argument.raw
    return f"{argument.name}={argument.raw}"
