"""Static checks of a validated spec that need no model (AS4xx warnings)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

from . import syntax as ast
from .codes import diagnostic
from .diagnostics import Diagnostic

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


def overridden(rule, by, filename: str, path: Optional[str] = None) -> Diagnostic:
    """AS401, from the static checks and from the planner alike: `rule` decides no module, because the later rule
    `by` overrides it everywhere, or (on a model, `path` given) later rules do, `by` among them on `path`."""
    if path is None:
        why = f"line {by.span.line} ('{by.text}') overrides it on every module"
    else:
        why = f"later rules override it on every module it matches, e.g. line {by.span.line} ('{by.text}') on '{path}'"
    return diagnostic(
        "AS401",
        f"this rule never decides anything: {why}",
        rule.span,
        "the last matching rule wins; delete this rule or move it below the other one",
        filename,
    )


def static_checks(spec: Union["Spec", "CheckedSpec"]) -> list[Diagnostic]:
    """AS401 (a rule that later rules override everywhere), AS402 (duplicate rule), AS403 (unused defaults)."""
    diagnostics: list[Diagnostic] = []

    def warn(code, message, span, help=None):
        diagnostics.append(diagnostic(code, message, span, help, spec.filename))

    overriding = overriding_rules(spec)
    for rule, duplicate in _duplicates(spec):
        if duplicate is not None:
            warn(
                "AS402",
                f"duplicate rule: line {duplicate.span.line} says the same",
                rule.span,
                "delete one of the two lines",
            )
        elif rule.index in overriding:
            diagnostics.append(overridden(rule, overriding[rule.index], spec.filename))

    used_kinds = {rule.transform.kind for rule in spec.rules}
    for kind, span in spec.defaults_spans.items():
        if kind not in used_kinds:
            warn("AS403", f"'defaults {kind}' is unused: no rule uses {kind}", span, "delete the defaults line")
    return diagnostics


def _duplicates(spec) -> list:
    """(rule, the nearest later rule saying the same or None) for every rule, in order."""
    later_same: dict = {}
    pairs = []
    for rule in reversed(spec.rules):
        pairs.append((rule, later_same.get((rule.text, rule.transform))))
        later_same[(rule.text, rule.transform)] = rule
    return pairs[::-1]


def overriding_rules(spec) -> dict:
    """Rule index → the nearest later rule that overrides it on every module whatever the model: the same
    selector (with its type filter or none), or a universal one. Backwards, so that many rules take linear time."""
    later_selector: dict = {}
    later_universal: dict = {}
    found = {}
    for rule in reversed(spec.rules):
        candidates = [
            later_selector.get((rule.selector.text, None)),
            later_selector.get((rule.selector.text, rule.type_filter)),
            later_universal.get(None),
            later_universal.get(rule.type_filter),
        ]
        nearest = min((other for other in candidates if other is not None), key=lambda o: o.index, default=None)
        if nearest is not None:
            found[rule.index] = nearest
        later_selector[(rule.selector.text, rule.type_filter)] = rule
        if _is_universal(rule):
            later_universal[rule.type_filter] = rule
    return found
