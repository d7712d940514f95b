"""Diagnostics as data: spans, codes, severities, rendering (text, JSON, GitHub) and SpecError."""

from __future__ import annotations

import json
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


MAX_SHOWN_LINE = 200


def _source_excerpt(source: str, span: Span) -> list[str]:
    lines = source.split("\n")
    if not (1 <= span.line <= len(lines)):
        return []
    text = lines[span.line - 1].rstrip("\r")
    start_col = span.column
    if span.end_line == span.line:
        end_col = max(span.end_column, start_col + 1)
    else:
        end_col = max(len(text) + 1, start_col + 1)
    offset = 0
    if len(text) > MAX_SHOWN_LINE:
        offset = max(0, start_col - 1 - MAX_SHOWN_LINE // 2)
        text = ("…" if offset else "") + text[offset : offset + MAX_SHOWN_LINE] + "…"
        shift = 1 if offset else 0
        start_col = start_col - offset + shift
        end_col = min(end_col - offset + shift, len(text) + 1)
    gutter = str(span.line)
    pad = " " * len(gutter)
    text = text.replace("\t", " ")
    carets = " " * (start_col - 1) + "^" * max(1, end_col - start_col)
    return [f"{gutter} | {text}", f"{pad} | {carets}"]


def render_one(diagnostic: Diagnostic, source: str | None = None) -> str:
    d = diagnostic
    label = "" if d.severity is Severity.ERROR else f"{d.severity.value}: "
    if d.span is not None:
        head = f"{d.filename}:{d.span.line}:{d.span.column}: {d.code} {label}{d.message}"
    else:
        head = f"{d.filename}: {d.code} {label}{d.message}"
    out = [head]
    if d.span is not None and source is not None:
        out.extend("  " + line for line in _source_excerpt(source, d.span))
    out.extend(f"  note: {n}" for n in d.notes)
    if d.help:
        out.append(f"  help: {d.help}")
    return "\n".join(out)


def sort_key(d: Diagnostic):
    span = d.span or Span(0, 0, 0, 0)
    return (d.filename, span.line, span.column, d.code)


def render_text(diagnostics: Iterable[Diagnostic], sources: dict[str, str] | None = None) -> str:
    sources = sources or {}
    return "\n".join(render_one(d, sources.get(d.filename)) for d in diagnostics)


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
