"""Static checks of a spec without a model (AS4xx warnings)."""

from __future__ import annotations

from adapterspec.language.checks import static_checks
from adapterspec.language.diagnostics import Severity
from adapterspec.language.lint import diagnose, lint_text, parse_spec


def warnings(text: str) -> list[tuple[str, int]]:
    diagnostics = lint_text(text, "t.aspec")
    assert all(d.severity is Severity.WARNING for d in diagnostics), [d.message for d in diagnostics]
    return [(d.code, d.span.line) for d in diagnostics]


def test_clean_spec_has_no_warnings():
    assert warnings("defaults lora(r=4)\nlayers[*].self_attn.<q,v>_proj: lora\nlayers[0]: none\n**.*norm: full\n") == []


def test_same_selector_later_overrides_AS401():
    (d,) = lint_text("q_proj: lora\nk_proj: lora\nq_proj: none\n", "t")
    assert (d.code, d.span.line) == ("AS401", 1)
    assert "line 3 ('q_proj')" in d.message


def test_universal_rule_later_overrides_everything_before():
    assert warnings("q: lora\nk@linear: dora\n**: none\n") == [("AS401", 1), ("AS401", 2)]
    assert warnings("q: lora\n/**: none\n") == [("AS401", 1)]
    assert warnings("q: lora\n**.*: full\n") == [("AS401", 1)]


def test_later_rule_with_a_type_filter_overrides_only_the_same_filter():
    assert warnings("q@linear: lora\nq@linear: dora\n") == [("AS401", 1)]
    assert warnings("q: lora\nq@linear: none\n") == []
    assert warnings("q@embedding: lora\n**@linear: none\n") == []
    assert warnings("q@linear: lora\n**@linear: none\n") == [("AS401", 1)]


def test_selector_spelling_does_not_hide_an_override():
    assert warnings("layers[ 0 : 2 ]: lora\nlayers[0:2]: none\n") == [("AS401", 1)]


def test_an_earlier_rule_is_not_overridden_by_a_narrower_later_one():
    assert warnings("layers[*]: lora\nlayers[0]: none\n**.q_proj: dora\n") == []


def test_duplicate_rule_AS402():
    (d,) = lint_text("q: lora(r=8)\nk: lora\nq: lora\n", "t")
    assert (d.code, d.span.line) == ("AS402", 1)
    assert "line 3" in d.message


def test_duplicate_compares_resolved_transforms():
    assert warnings("q: lora(alpha=16)\nq: lora(r=8, alpha=16)\n") == [("AS402", 1)]
    assert warnings("q: lora(r=4)\nq: lora(r=8)\n") == [("AS401", 1)]


def test_unused_defaults_AS403():
    (d,) = lint_text("defaults dora(r=4)\nq: lora\n", "t")
    assert (d.code, d.span.line) == ("AS403", 1)
    assert "'defaults dora' is unused" in d.message


def test_defaults_after_first_rule_AS404():
    assert warnings("q: lora\ndefaults lora(r=4)\n") == [("AS404", 2)]


def test_warnings_leave_the_spec_valid():
    spec = parse_spec("q: lora\nq: lora\n")
    assert len(spec.rules) == 2


def test_checks_accept_the_public_spec_too():
    text = "defaults dora(r=4)\nq: lora\nq: none\n"
    checked, _ = diagnose(text)
    from_checked = [(d.code, d.span.line) for d in static_checks(checked)]
    from_spec = [(d.code, d.span.line) for d in static_checks(parse_spec(text))]
    assert from_checked == from_spec == [("AS401", 2), ("AS403", 1)]


def test_many_rules_are_each_reported_once():
    # How the time grows with the number of rules is measured by benchmarks/lint.py, not here.
    text = "".join(f"layers[{i}].q_proj: lora(r={1 + i % 7})\n" for i in range(9_999)) + "**: none\n"
    diagnostics = lint_text(text, "t")
    assert len(diagnostics) == 9_999 and {d.code for d in diagnostics} == {"AS401"}
