"""Static checks of a validated spec that need no model (AS4xx warnings)."""

from __future__ import annotations

from . import syntax as ast
from .diagnostics import Diagnostic, Severity
from .spec import Spec


def _is_universal(rule) -> bool:
    """A selector that matches every module: `**`, `/**`, `**.*` (with no type filter)."""
    if rule.type_filter is not None:
        return False
    segments = rule.selector.segments
    if not segments or not isinstance(segments[0], ast.DeepSegment):
        return False
    rest = segments[1:]
    if not rest:
        return True
    only = rest[0]
    return (
        len(rest) == 1
        and isinstance(only, ast.NameSegment)
        and only.index is None
        and len(only.pieces) == 1
        and isinstance(only.pieces[0], ast.Star)
    )


def static_checks(spec: Spec) -> list[Diagnostic]:
    diagnostics: list[Diagnostic] = []

    def warn(code, message, span, help=None, notes=()):
        diagnostics.append(Diagnostic(code, Severity.WARNING, message, span, help, spec.filename, tuple(notes)))

    rules = spec.rules
    for position, rule in enumerate(rules):
        later = rules[position + 1 :]
        duplicate = next(
            (other for other in later if other.text == rule.text and other.transform == rule.transform), None
        )
        if duplicate is not None:
            warn("AS402", f"duplicate rule: line {duplicate.span.line} says the same", rule.span,
                 "delete one of the two lines")
            continue
        overriding = next(
            (
                other
                for other in later
                if (other.selector.text == rule.selector.text and other.type_filter in (None, rule.type_filter))
                or _is_universal(other)
            ),
            None,
        )
        if overriding is not None:
            warn(
                "AS401",
                f"this rule never decides anything: line {overriding.span.line} ('{overriding.text}') "
                f"overrides it on every module",
                rule.span,
                "the last matching rule wins; delete this rule or move it below the other one",
            )

    used_kinds = {rule.transform.kind for rule in rules}
    for kind, span in spec.defaults_spans.items():
        if kind not in used_kinds:
            warn("AS403", f"'defaults {kind}' is unused: no rule uses {kind}", span, "delete the defaults line")
    return diagnostics
