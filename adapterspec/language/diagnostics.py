"""Diagnostics as data: spans, codes, severities, rendering (text, JSON, GitHub) and SpecError."""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable


class Severity(str, Enum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True, order=True)
class Span:
    """A half-open region of a source text; lines and columns count from 1."""

    line: int
    column: int
    end_line: int
    end_column: int
    start: int = 0
    end: int = 0

    @classmethod
    def at(cls, text: str, start: int, end: int | None = None) -> "Span":
        """The span of text[start:end], with line and column computed from offsets."""
        end = start if end is None else end
        line, column = line_col(text, start)
        end_line, end_column = line_col(text, end)
        return cls(line, column, end_line, end_column, start, end)

    def to_json(self) -> dict:
        return {
            "line": self.line,
            "column": self.column,
            "end_line": self.end_line,
            "end_column": self.end_column,
        }


def line_col(text: str, offset: int) -> tuple[int, int]:
    offset = max(0, min(offset, len(text)))
    line = text.count("\n", 0, offset) + 1
    line_start = text.rfind("\n", 0, offset) + 1
    return line, offset - line_start + 1


@dataclass(frozen=True)
class Diagnostic:
    code: str
    severity: Severity
    message: str
    span: Span | None = None
    help: str | None = None
    filename: str = "<spec>"
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_error(self) -> bool:
        return self.severity is Severity.ERROR

    def with_filename(self, filename: str) -> "Diagnostic":
        return Diagnostic(self.code, self.severity, self.message, self.span, self.help, filename, self.notes)

    def to_json(self) -> dict:
        return {
            "code": self.code,
            "severity": self.severity.value,
            "message": self.message,
            "file": self.filename,
            "span": self.span.to_json() if self.span else None,
            "help": self.help,
            "notes": list(self.notes),
        }


class SpecError(Exception):
    """Raised by the Python API when a spec has errors; holds every diagnostic of the run."""

    def __init__(self, diagnostics: Iterable[Diagnostic], source: str | None = None):
        self.diagnostics = list(diagnostics)
        self.source = source
        errors = [d for d in self.diagnostics if d.is_error]
        first = errors[0] if errors else (self.diagnostics[0] if self.diagnostics else None)
        summary = f"{len(errors)} error(s)"
        if first is not None:
            where = f"{first.filename}:{first.span.line}:{first.span.column}: " if first.span else f"{first.filename}: "
            summary += f"; first: {where}{first.code} {first.message}"
        super().__init__(summary)

    def render(self) -> str:
        return render_text(self.diagnostics, {d.filename: self.source for d in self.diagnostics} if self.source else {})


MAX_SHOWN_LINE = 160


def _char_width(char: str) -> int:
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def _shown(char: str) -> str:
    """What the excerpt prints for one source character: tabs as a space, control characters as '�'."""
    if char == "\t":
        return " "
    return char if char.isprintable() else "\ufffd"


def _source_excerpt(lines: list[str], span: Span) -> list[str]:
    if not (1 <= span.line <= len(lines)):
        return []
    text = lines[span.line - 1].rstrip("\r")
    start = min(span.column - 1, len(text))
    end = span.end_column - 1 if span.end_line == span.line else len(text)
    end = max(end, start + 1)
    window_start = 0
    if len(text) > MAX_SHOWN_LINE:
        window_start = max(0, min(start - MAX_SHOWN_LINE // 2, len(text) - MAX_SHOWN_LINE))
    window = text[window_start : window_start + MAX_SHOWN_LINE]
    before = "…" if window_start > 0 else ""
    after = "…" if window_start + MAX_SHOWN_LINE < len(text) else ""
    shown = [_shown(char) for char in window]
    caret_start = len(before) + sum(_char_width(c) for c in shown[: start - window_start])
    caret_width = sum(_char_width(c) for c in shown[start - window_start : end - window_start])
    gutter = str(span.line)
    pad = " " * len(gutter)
    carets = " " * caret_start + "^" * max(1, caret_width)
    return [f"{gutter} | {before}{''.join(shown)}{after}".rstrip(), f"{pad} | {carets}"]


def render_one(diagnostic: Diagnostic, source: str | list[str] | None = None) -> str:
    """`path:line:col: CODE message`, the source line with carets under the span, notes, `help:`.

    `source` is the text, or its lines (split once when many diagnostics share one text)."""
    d = diagnostic
    label = "" if d.severity is Severity.ERROR else f"{d.severity.value}: "
    where = f"{d.filename}:{d.span.line}:{d.span.column}" if d.span is not None else d.filename
    out = [f"{where}: {d.code} {label}{d.message}"]
    if d.span is not None and source is not None:
        lines = source.split("\n") if isinstance(source, str) else source
        out.extend("  " + line for line in _source_excerpt(lines, d.span))
    out.extend(f"  note: {note}" for note in d.notes)
    if d.help:
        out.append(f"  help: {d.help}")
    return "\n".join(out)


def sort_key(d: Diagnostic):
    span = d.span or Span(0, 0, 0, 0)
    return (d.filename, span.line, span.column, d.code)


def render_text(diagnostics: Iterable[Diagnostic], sources: dict[str, str] | None = None) -> str:
    """Every diagnostic as `render_one` prints it, separated by blank lines."""
    lines = {name: text.split("\n") for name, text in (sources or {}).items()}
    return "\n\n".join(render_one(d, lines.get(d.filename)) for d in diagnostics)


def render_json(diagnostics: Iterable[Diagnostic]) -> str:
    return "\n".join(json.dumps(d.to_json(), ensure_ascii=False) for d in diagnostics)


def _github_escape(text: str, *, property_value: bool = False) -> str:
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if property_value:
        text = text.replace(":", "%3A").replace(",", "%2C")
    return text


def render_github(diagnostics: Iterable[Diagnostic]) -> str:
    """GitHub Actions workflow commands (::error file=…,line=…::message)."""
    level = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "notice"}
    out = []
    for d in diagnostics:
        props = [f"file={_github_escape(d.filename, property_value=True)}"]
        if d.span is not None:
            props += [f"line={d.span.line}", f"col={d.span.column}"]
            if d.span.end_line == d.span.line:
                props.append(f"endColumn={d.span.end_column}")
            else:
                props.append(f"endLine={d.span.end_line}")
        props.append(f"title={d.code}")
        message = d.message + (f" (help: {d.help})" if d.help else "")
        out.append(f"::{level[d.severity]} {','.join(props)}::{_github_escape(d.code + ' ' + message)}")
    return "\n".join(out)


def has_errors(diagnostics: Iterable[Diagnostic]) -> bool:
    return any(d.is_error for d in diagnostics)
