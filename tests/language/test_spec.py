"""Validation (AS2xx), argument resolution, and the public pydantic models."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from adapterspec import SpecError, parse_spec
from adapterspec.language.lint import lint_text
from adapterspec.language.spec import LoraArguments, Rule, Spec, Transform, resolve

PYDANTIC_WORDS = ("validation error", "Input should", "input_value", "pydantic", "type=", "errors.pydantic.dev",
                  "Value error,", "[type=")  # fmt: skip


def codes(text: str) -> list[str]:
    return [d.code for d in lint_text(text, "t.aspec")]


def only(text: str):
    diagnostics = lint_text(text, "t.aspec")
    assert len(diagnostics) == 1, [d.message for d in diagnostics]
    return diagnostics[0]


def transform(text: str) -> Transform:
    return parse_spec(text).rules[-1].transform


# --- resolution --------------------------------------------------------------------------------


def test_bare_lora_has_mlx_lm_defaults():
    t = transform("q_proj: lora")
    assert (t.kind, t.r, t.scale, t.dropout, t.alpha, t.rslora) == ("lora", 8, 20.0, 0.0, None, False)


def test_alpha_becomes_scale_over_r():
    t = transform("q_proj: lora(r=16, alpha=32)")
    assert t.scale == 2.0 and t.alpha == 32.0


def test_rslora_divides_by_the_square_root_of_r():
    t = transform("q_proj: lora(r=16, alpha=32, rslora=true)")
    assert t.scale == pytest.approx(32 / math.sqrt(16)) and t.rslora


def test_rule_arguments_override_defaults_one_by_one():
    t = transform("defaults lora(r=4, scale=10.0, dropout=0.1)\nq: lora(r=16)")
    assert (t.r, t.scale, t.dropout) == (16, 10.0, 0.1)


def test_alpha_at_a_rule_replaces_scale_from_defaults():
    t = transform("defaults lora(r=4, scale=10.0)\nq: lora(alpha=8)")
    assert (t.scale, t.alpha) == (2.0, 8.0)


def test_scale_at_a_rule_replaces_alpha_and_rslora_from_defaults():
    t = transform("defaults lora(alpha=8, rslora=true)\nq: lora(scale=3)")
    assert (t.scale, t.alpha, t.rslora) == (3.0, None, False)


def test_defaults_alpha_uses_the_rules_r():
    t = transform("defaults lora(alpha=16)\nq: lora(r=4)")
    assert t.scale == 4.0


def test_defaults_are_per_kind():
    spec = parse_spec("defaults dora(r=2)\nq: lora\nk: dora")
    assert [(r.transform.kind, r.transform.r) for r in spec.rules] == [("lora", 8), ("dora", 2)]


def test_full_and_none_have_no_arguments():
    for kind in ("full", "none"):
        t = transform(f"q: {kind}")
        assert (t.kind, t.r, t.scale, t.adapts) == (kind, None, None, False)


def test_describe_shows_the_resolved_scale():
    assert transform("q: lora(r=16, alpha=32, dropout=0.1)").describe() == "lora(r=16, scale=2 [alpha=32], dropout=0.1)"
    assert transform("q: none").describe() == "none"


def test_integers_are_accepted_for_float_arguments():
    t = transform("q: lora(scale=2, dropout=0)")
    assert isinstance(t.scale, float) and t.scale == 2.0


# --- the Spec object ---------------------------------------------------------------------------


def test_spec_fields():
    text = "adapterspec 1\ndefaults lora(r=4)\nlayers[-2:]@linear: lora  # c\n/lm_head: full\n"
    spec = parse_spec(text, filename="x.aspec")
    assert isinstance(spec, Spec) and spec.filename == "x.aspec" and spec.source == text and spec.version == 1
    assert spec.defaults["lora"] == LoraArguments(r=4)
    assert spec.defaults_spans["lora"].line == 2
    first, second = spec.rules
    assert isinstance(first, Rule)
    assert (first.index, first.text, first.type_filter, first.span.line) == (0, "layers[-2:]@linear", "linear", 3)
    assert text.splitlines()[2][first.transform_span.column - 1 : first.transform_span.end_column - 1] == "lora"
    assert first.type_filter_span.column == len("layers[-2:]") + 1
    assert (second.index, second.text, second.selector.anchored, second.type_filter_span) == (1, "/lm_head", True, None)


def test_spec_dumps_to_json():
    spec = parse_spec("q: lora(r=4)")
    dumped = spec.model_dump_json()
    assert '"kind":"lora"' in dumped and '"r":4' in dumped


def test_models_are_frozen():
    spec = parse_spec("q: lora")
    with pytest.raises(ValidationError):
        spec.rules[0].transform.r = 3


def test_lora_arguments_validates_with_our_messages():
    with pytest.raises(ValidationError) as error:
        LoraArguments(r=0)
    assert "r must be a whole number from 1 to 65536" in str(error.value)
    for bad in ({"r": 1.5}, {"r": True}, {"dropout": 1.0}, {"alpha": -1.0}, {"scale": float("inf")},
                {"rslora": 1}, {"rank": 8}):  # fmt: skip
        with pytest.raises(ValidationError):
            LoraArguments(**bad)


def test_resolve_on_pydantic_arguments():
    t = resolve("lora", LoraArguments(r=4, alpha=8.0), LoraArguments(dropout=0.2))
    assert (t.r, t.scale, t.dropout) == (4, 2.0, 0.2)


def test_spec_error_holds_every_diagnostic():
    with pytest.raises(SpecError) as error:
        parse_spec("q: lora(rank=8)\nk: lorra\nv v: lora\n", filename="bad.aspec")
    assert [d.code for d in error.value.diagnostics] == ["AS201", "AS202", "AS103"]
    assert "3 error(s)" in str(error.value) and "bad.aspec:1:9: AS201" in str(error.value)
    assert "  1 | q: lora(rank=8)" in error.value.render()


# --- AS2xx -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, code, column, fragment", [
    ("q: lora(rank=8)", "AS201", 9, "did you mean 'r'?"),
    ("q: lora(lora_alpha=8)", "AS201", 9, "did you mean 'alpha'?"),
    ("q: lora(bananas=8)", "AS201", 9, "unknown argument 'bananas' for lora"),
    ("q: qlora", "AS202", 4, "did you mean 'lora'?"),
    ("q: freeze", "AS202", 4, "did you mean 'none'?"),
    ("q: LoRA", "AS202", 4, "did you mean 'lora'?"),
    ("q@lin: lora", "AS203", 2, "did you mean 'linear'?"),
    ("q@expert: lora", "AS203", 2, "did you mean 'experts'?"),
    ("q: lora(r=1.5)", "AS204", 11, "r must be a whole number, got 1.5"),
    ("q: lora(scale=true)", "AS204", 15, "scale must be a number"),
    ("q: lora(rslora=yes)", "AS204", 16, "rslora must be true or false, got yes"),
    ("q: lora(rslora=True, alpha=1)", "AS204", 16, "rslora must be true or false"),
    ("q: lora(dropout=none)", "AS204", 17, "dropout must be a number"),
    ("q: lora(alpha=inf)", "AS204", 15, "alpha must be a number"),
    ("q: lora(r=0)", "AS205", 11, "r must be a whole number from 1 to 65536, got 0"),
    ("q: lora(r=-3)", "AS205", 11, "from 1 to 65536"),
    ("q: lora(r=" + "9" * 400 + ", alpha=16)", "AS205", 11, "from 1 to 65536"),
    ("q: lora(alpha=" + "9" * 400 + ")", "AS205", 15, "alpha must be a finite number > 0"),
    ("q: lora(alpha=0)", "AS205", 15, "alpha must be a finite number > 0"),
    ("q: lora(scale=1e999)", "AS205", 15, "scale must be a finite number"),
    ("q: lora(dropout=1)", "AS205", 17, "dropout must be at least 0 and below 1"),
    ("q: lora(dropout=-0.1)", "AS205", 17, "below 1"),
    ("q: lora(scale=1, alpha=2)", "AS206", 18, "either scale or alpha"),
    ("q: lora(rslora=true)", "AS207", 9, "rslora needs alpha"),
    ("q: lora(scale=2, rslora=true)", "AS207", 18, "rslora needs alpha"),
    ("q: full(r=8)", "AS208", 9, "'full' does not take 'r'"),
    ("q: none()", "AS208", 4, "'none' takes no arguments"),
    ("q: lora(r=8, r=9)", "AS209", 14, "argument 'r' is given twice"),
    ("q: lora\nadapterspec 1", "AS210", 1, "must come before every other line"),
    ("adapterspec 2\nq: lora", "AS210", 1, "unsupported spec version 2"),
    ("defaults lora\ndefaults lora(r=2)\nq: lora", "AS211", 1, "second 'defaults lora'"),
    ("defaults full\nq: lora", "AS212", 10, "'full' has no defaults line"),
    ("q: tokens", "AS215", 4, "tokens needs the rows"),
    ("q: tokens(lr_scale=2)", "AS215", 4, "tokens needs the rows"),
    ("q: tokens([5, 3:7])", "AS205", 11, "row 5 is listed twice"),
    ("q: tokens([7:7])", "AS205", 11, "the range 7:7 is empty"),
    ("q: tokens([-1])", "AS205", 11, "row -1 is negative"),
    ("q: tokens([0:2000000])", "AS205", 11, "more than 1,048,576 rows"),
    ("q: tokens(rows=4)", "AS204", 16, "rows must be a list"),
    ("q: lora([1])", "AS208", 9, "'lora' does not take a row list"),
    ("q: tokens([1], r=4)", "AS208", 16, "'tokens' does not take 'r'"),
    ("q: full(loraplus=4)", "AS208", 9, "'full' does not take 'loraplus'"),
    ("q: lora(init=svd)", "AS205", 14, "init must be one of default, gaussian, pissa, olora"),
    ("q: lora(init=1)", "AS204", 14, "init must be a name"),
    ("q: lora(lr_scale=0)", "AS205", 18, "lr_scale must be a finite number > 0"),
    ("q: lora(loraplus=-2)", "AS205", 18, "loraplus must be a finite number > 0"),
    ("q: full(weight_decay=-1)", "AS205", 22, "weight_decay must be a finite number ≥ 0"),
    ("q: lora(loraplus_lr_ratio=16)", "AS201", 9, "did you mean 'loraplus'"),
    ("layers[::0]: none", "AS213", 7, "slice step cannot be zero"),
    ("", "AS214", 1, "no rules"),
    ("# only a comment\n\n", "AS214", 1, "no rules"),
    ("adapterspec 1\ndefaults lora(r=2)\n", "AS214", 1, "no rules"),
])  # fmt: skip
def test_validation_diagnostic(text, code, column, fragment):
    d = next(d for d in lint_text(text, "t.aspec") if d.is_error)
    assert (d.code, d.span.column) == (code, column), d.message
    assert fragment in d.message
    assert d.help


def test_rslora_from_defaults_names_the_defaults_line():
    d = only("defaults lora(rslora=true)\nq: lora")
    assert d.code == "AS207" and d.span.line == 2 and "line 1" in d.notes[0]


def test_every_bad_argument_of_a_call_is_reported():
    assert codes("q: lora(r=0, alpha=-1, dropout=1, rslora=maybe, scale=inf, rank=2)") == [
        "AS205",
        "AS205",
        "AS205",
        "AS204",
        "AS204",
        "AS201",
    ]


def test_no_rules_is_not_reported_when_a_line_failed_to_parse():
    assert codes("q_proj lora") == ["AS103"]


def test_errors_in_several_rules_are_all_reported():
    assert codes("a: lora(rank=1)\nb: lorra\nc@lin: full\nd: none(r=1)\n") == ["AS201", "AS202", "AS203", "AS208"]


def test_a_class_name_type_filter_is_accepted():
    assert parse_spec("q@QuantizedSwitchLinear: lora").rules[0].type_filter == "QuantizedSwitchLinear"


def test_version_line_after_comments_is_fine():
    assert codes("# header\n\nadapterspec 1\nq: lora\n") == []


# --- nothing from pydantic ever reaches a user -------------------------------------------------

BAD_VALUES = ["0", "-1", "1.5", "true", "false", "maybe", "inf", "nan", "1e999", "-1e999", "+0", "x",
              "99999999999999999999999999", "0.99999", "1.0", "-0.0", "1e-400"]  # fmt: skip


@pytest.mark.parametrize("name", ["r", "scale", "alpha", "rslora", "dropout", "rank"])
def test_no_pydantic_message_reaches_the_user(name):
    for value in BAD_VALUES:
        for text in (f"q: lora({name}={value})", f"defaults dora({name}={value}, {name}={value})\nq: dora"):
            for d in lint_text(text, "t.aspec"):
                blob = " ".join([d.message, d.help or "", *d.notes])
                assert not any(word in blob for word in PYDANTIC_WORDS), blob
            try:
                parse_spec(text)
            except SpecError as error:
                assert not any(word in str(error) + error.render() for word in PYDANTIC_WORDS)


def test_training_arguments_resolve_through_defaults_and_show_in_the_description():
    spec = parse_spec(
        "defaults lora(r=16, alpha=32, init=pissa, loraplus=16)\n"
        "a: lora\n"
        "b: lora(r=8, lr_scale=0.5, loraplus=4)\n"
        "c: tokens([318, 310:312], lr_scale=0.1)\n"
        "d: full(lr_scale=0.1, weight_decay=0)\n"
    )
    a, b, c, d = (rule.transform for rule in spec.rules)
    assert (a.r, a.scale, a.init, a.loraplus, a.lr_scale) == (16, 2.0, "pissa", 16.0, 1.0)
    assert (b.r, b.scale, b.init, b.loraplus, b.lr_scale) == (8, 4.0, "pissa", 4.0, 0.5)
    assert (c.kind, c.rows, c.lr_scale) == ("tokens", (318, 310, 311), 0.1)
    assert (d.kind, d.lr_scale, d.weight_decay) == ("full", 0.1, 0.0)
    assert b.describe() == "lora(r=8, scale=4 [alpha=32], init=pissa, lr×0.5, loraplus=4)"
    assert c.describe() == "tokens([318, 310, 311], lr×0.1)"
    assert d.describe() == "full(lr×0.1, weight_decay=0)"
    assert spec.rules[2].rows_span.column == 11
