"""Static checks of a validated spec that need no model (AS4xx warnings)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

from . import syntax as ast
from .diagnostics import Diagnostic, Severity

if TYPE_CHECKING:
    from .spec import Spec
    from .validate import CheckedSpec


def _is_universal(rule) -> bool:
    """A selector that matches every module: `**`, `/**`, `**.*`."""
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


def static_checks(spec: Union["Spec", "CheckedSpec"]) -> list[Diagnostic]:
    """AS401 (a rule that later rules override everywhere), AS402 (duplicate rule), AS403 (unused defaults)."""
    diagnostics: list[Diagnostic] = []

    def warn(code, message, span, help=None):
        diagnostics.append(Diagnostic(code, Severity.WARNING, message, span, help, spec.filename))

    # Walk the rules backwards, remembering the nearest later rule of each kind, so that a file of
    # many rules takes linear time.
    later_same: dict = {}
    later_selector: dict = {}
    later_universal: dict = {}
    for rule in reversed(spec.rules):
        duplicate = later_same.get((rule.text, rule.transform))
        candidates = [
            later_selector.get((rule.selector.text, None)),
            later_selector.get((rule.selector.text, rule.type_filter)),
            later_universal.get(None),
            later_universal.get(rule.type_filter),
        ]
        overriding = min((other for other in candidates if other is not None), key=lambda o: o.index, default=None)
        if duplicate is not None:
            warn("AS402", f"duplicate rule: line {duplicate.span.line} says the same", rule.span,
                 "delete one of the two lines")
        elif overriding is not None:
            warn("AS401",
                 f"this rule never decides anything: line {overriding.span.line} ('{overriding.text}') "
                 f"overrides it on every module",
                 rule.span, "the last matching rule wins; delete this rule or move it below the other one")
        later_same[(rule.text, rule.transform)] = rule
        later_selector[(rule.selector.text, rule.type_filter)] = rule
        if _is_universal(rule):
            later_universal[rule.type_filter] = rule
    diagnostics.reverse()

    used_kinds = {rule.transform.kind for rule in spec.rules}
    for kind, span in spec.defaults_spans.items():
        if kind not in used_kinds:
            warn("AS403", f"'defaults {kind}' is unused: no rule uses {kind}", span, "delete the defaults line")
    return diagnostics
