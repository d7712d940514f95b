"""The parser: every form of the language becomes the right syntax node with the right span; AS1xx otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapterspec.language import syntax as ast
from adapterspec.language.parse import (
    MAX_FILE_BYTES,
    MAX_LINE_CHARS,
    decode,
    parse_text,
)

ROOT = Path(__file__).resolve().parents[2]


def parse_ok(text: str) -> ast.SpecTree:
    tree, diagnostics = parse_text(text, "t.aspec")
    assert diagnostics == [], [d.message for d in diagnostics]
    return tree


def only_rule(text: str) -> ast.RuleLine:
    items = parse_ok(text).items
    assert len(items) == 1 and isinstance(items[0], ast.RuleLine)
    return items[0]


def selector(text: str) -> ast.Selector:
    return only_rule(f"{text}: lora").selector


def errors(text: str) -> list[tuple[str, int, int]]:
    _tree, diagnostics = parse_text(text, "t.aspec")
    return [(d.code, d.span.line, d.span.column) for d in diagnostics]


# --- selectors -------------------------------------------------------------------------------


def test_plain_dotted_path():
    sel = selector("self_attn.q_proj")
    assert not sel.anchored
    assert [s.pieces[0].text for s in sel.segments] == ["self_attn", "q_proj"]
    assert all(s.index is None for s in sel.segments)
    assert sel.text == "self_attn.q_proj"


def test_numeric_segment_is_a_name():
    sel = selector("layers.0.mlp")
    assert [s.pieces[0].text for s in sel.segments] == ["layers", "0", "mlp"]


@pytest.mark.parametrize("text, kinds", [
    ("*_proj", [ast.Star, ast.Literal]),
    ("*norm", [ast.Star, ast.Literal]),
    ("q_*", [ast.Literal, ast.Star]),
    ("a*b*c", [ast.Literal, ast.Star, ast.Literal, ast.Star, ast.Literal]),
])  # fmt: skip
def test_star_inside_a_segment(text, kinds):
    (segment,) = selector(text).segments
    assert [type(p) for p in segment.pieces] == kinds


def test_alternation_inside_a_segment():
    (segment,) = selector("<q,k,v>_proj").segments
    alternation, suffix = segment.pieces
    assert isinstance(alternation, ast.Alternation)
    assert [[p.text for p in option] for option in alternation.options] == [["q"], ["k"], ["v"]]
    assert suffix.text == "_proj"


def test_alternative_with_a_star():
    (segment,) = selector("<q*,gate>").segments
    (alternation,) = segment.pieces
    first, second = alternation.options
    assert [type(p) for p in first] == [ast.Literal, ast.Star]
    assert [p.text for p in second] == ["gate"]


def test_single_star_and_double_star_segments():
    sel = selector("**.mlp.*")
    deep, mlp, star = sel.segments
    assert isinstance(deep, ast.DeepSegment)
    assert isinstance(star, ast.NameSegment) and isinstance(star.pieces[0], ast.Star)
    assert sel.text == "**.mlp.*"


@pytest.mark.parametrize("text, expected", [
    ("layers[*]", ast.IndexAll),
    ("layers[3]", ast.IndexList),
    ("layers[-1]", ast.IndexList),
    ("layers[0,5,9]", ast.IndexList),
    ("layers[0:8]", ast.IndexSlice),
    ("layers[-4:]", ast.IndexSlice),
    ("layers[::2]", ast.IndexSlice),
    ("layers[1:7:3]", ast.IndexSlice),
    ("layers[:]", ast.IndexSlice),
])  # fmt: skip
def test_index_forms(text, expected):
    (segment,) = selector(text).segments
    assert isinstance(segment.index, expected)


@pytest.mark.parametrize("text, values", [
    ("layers[3]", (3,)),
    ("layers[-1]", (-1,)),
    ("layers[0,5,9]", (0, 5, 9)),
    ("layers[+2]", (2,)),
])  # fmt: skip
def test_index_list_values(text, values):
    assert selector(text).segments[0].index.values == values


@pytest.mark.parametrize("text, bounds", [
    ("layers[0:8]", (0, 8, None)),
    ("layers[-4:]", (-4, None, None)),
    ("layers[::2]", (None, None, 2)),
    ("layers[1:7:3]", (1, 7, 3)),
    ("layers[:3]", (None, 3, None)),
    ("layers[::-1]", (None, None, -1)),
    ("layers[2::]", (2, None, None)),
])  # fmt: skip
def test_slice_bounds(text, bounds):
    index = selector(text).segments[0].index
    assert (index.start, index.stop, index.step) == bounds


def test_anchored_selector():
    sel = selector("/lm_head")
    assert sel.anchored
    assert sel.text == "/lm_head"


def test_indexed_star_segment():
    (segment,) = selector("*[0]").segments
    assert isinstance(segment.pieces[0], ast.Star) and segment.index.values == (0,)


@pytest.mark.parametrize("written, canonical", [
    ("layers[ 0 : 8 ]", "layers[0:8]"),
    ("layers[ 0 , 5 ,9 ]", "layers[0,5,9]"),
    ("< q , v >_proj", "<q,v>_proj"),
    ("layers[2::]", "layers[2:]"),
    ("layers[+3]", "layers[3]"),
    ("layers[007]", "layers[7]"),
    ("layers[:]", "layers[:]"),
])  # fmt: skip
def test_selector_text_is_canonical(written, canonical):
    assert selector(written).text == canonical


def test_keywords_are_names_after_the_start_of_a_line():
    assert selector("**.defaults").text == "**.defaults"
    assert selector("/adapterspec").text == "/adapterspec"
    assert selector("defaultsx").text == "defaultsx"


# --- type filters, transforms ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "switch", "embedding", "QuantizedLinear", "anything"])
def test_type_filter(name):
    rule = only_rule(f"layers[-4:]@{name}: lora")
    assert rule.type_filter.name == name
    assert rule.type_filter.span.column == len("layers[-4:]") + 1


def test_transform_without_arguments():
    rule = only_rule("q_proj: full")
    assert rule.transform.name == "full"
    assert rule.transform.arguments is None


def test_transform_with_empty_parentheses():
    assert only_rule("q_proj: lora()").transform.arguments == ()


def test_transform_arguments_values_and_spans():
    line = "q_proj: lora(r=8, scale=1.5e1, alpha=-2, rslora=true, dropout=.05)"
    call = only_rule(line).transform
    values = {a.name: a.value for a in call.arguments}
    assert values == {"r": 8, "scale": 15.0, "alpha": -2, "rslora": "true", "dropout": 0.05}
    assert isinstance(values["r"], int) and isinstance(values["scale"], float)
    for argument in call.arguments:
        assert line[argument.name_span.start : argument.name_span.end] == argument.name
        assert line[argument.value_span.start : argument.value_span.end] == argument.raw


def test_trailing_comma_in_arguments():
    assert [a.name for a in only_rule("q_proj: lora(r=8,)").transform.arguments] == ["r"]


def test_spaces_around_colon_parenthesis_comma_and_equals():
    rule = only_rule("q_proj :  lora ( r = 8 ,  scale = 2 )")
    assert [(a.name, a.value) for a in rule.transform.arguments] == [("r", 8), ("scale", 2)]


def test_rule_span_covers_the_rule_but_not_the_comment():
    line = "  q_proj: lora(r=8)   # why"
    rule = only_rule(line)
    assert line[rule.span.start : rule.span.end] == "q_proj: lora(r=8)"
    assert rule.span.column == 3


# --- lines: version, defaults, comments, blanks, line endings ----------------------------------


def test_version_and_defaults_lines():
    tree = parse_ok("adapterspec 1\ndefaults lora(r=4)\nq_proj: lora\n")
    version, defaults, rule = tree.items
    assert isinstance(version, ast.VersionLine) and version.version == 1
    assert isinstance(defaults, ast.DefaultsLine) and defaults.transform.arguments[0].value == 4
    assert isinstance(rule, ast.RuleLine)


def test_comments_own_line_and_trailing():
    tree = parse_ok("# top\n  # indented\nq_proj: lora # why: not # a rule\n")
    assert [(c.text, c.trailing, c.span.line, c.span.column) for c in tree.comments] == [
        ("# top", False, 1, 1),
        ("# indented", False, 2, 3),
        ("# why: not # a rule", True, 3, 14),
    ]


def test_comment_text_loses_trailing_whitespace():
    (comment,) = parse_ok("# note   \t\nq: lora\n").comments
    assert comment.text == "# note"


def test_blank_lines_are_recorded():
    tree = parse_ok("\nq: lora\n   \n\t\nk: lora\n")
    assert tree.blank_lines == [1, 3, 4, 6]


def test_crlf_line_endings():
    text = "q_proj: lora\r\nk_proj: lora(r=4)  # c\r\n"
    tree = parse_ok(text)
    assert [i.span.line for i in tree.items] == [1, 2]
    second = tree.items[1]
    assert text[second.span.start : second.span.end] == "k_proj: lora(r=4)"
    assert tree.comments[0].text == "# c"


def test_tabs_separate_like_spaces_outside_selectors():
    rule = only_rule("\tq_proj:\tlora(r=8,\tscale=2)\t# c")
    assert rule.span.column == 2
    assert [a.name for a in rule.transform.arguments] == ["r", "scale"]


def test_tab_inside_a_selector_is_AS103():
    assert errors("q\t_proj: lora") == [("AS103", 1, 2)]


def test_bom_is_dropped_by_decode():
    text, diagnostics = decode("\ufeffq: lora\n".encode("utf-8"), "t.aspec")
    assert diagnostics == [] and text == "q: lora\n"


def test_form_feed_is_whitespace():
    assert only_rule("q_proj:\flora").transform.name == "lora"


def test_positions_are_in_characters_not_bytes():
    (d,) = parse_text("# ü\nq_proj: lora(r=8\n", "t.aspec")[1]
    assert (d.span.line, d.span.column) == (2, 17)
    assert parse_text("x: lora  # äöü\ny z: lora", "t")[1][0].span.column == 2


# --- syntax errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("q_proj lora(r=8)", ("AS103", 1, 7)),
    ("layers[*] .q_proj: lora", ("AS103", 1, 10)),
    ("<q v>_proj: lora", ("AS103", 1, 3)),
    ("x @linear: lora", ("AS103", 1, 2)),
    ("q_proj", ("AS102", 1, 7)),
    ("q_proj(r=8)", ("AS102", 1, 7)),
    ("q_proj: lora(r=8", ("AS104", 1, 17)),
    ("layers[0: none", ("AS104", 1, 11)),
    ("<q,v_proj: lora", ("AS104", 1, 10)),
    ("x: lora(r=8 alpha=2", ("AS104", 1, 13)),
    (": lora", ("AS106", 1, 1)),
    ("/: lora", ("AS106", 1, 2)),
    ("q_proj:", ("AS106", 1, 8)),
    ("defaults", ("AS106", 1, 9)),
    ("**_proj: lora", ("AS107", 1, 3)),
    ("***: lora", ("AS107", 1, 3)),
    ("**[0]: lora", ("AS107", 1, 3)),
    ("a..b: lora", ("AS107", 1, 3)),
    (".x: lora", ("AS107", 1, 1)),
    ("x.: lora", ("AS107", 1, 3)),
    ("x.", ("AS107", 1, 3)),
    ("<q,<k,v>>_proj: lora", ("AS107", 1, 4)),
    ("x-y: lora", ("AS101", 1, 2)),
    ("x: lora(r='8')", ("AS101", 1, 11)),
    ("é: lora", ("AS101", 1, 1)),
    ("x: lora(r=8) junk", ("AS101", 1, 14)),
    ("x: lora(r=8))", ("AS101", 1, 13)),
    ("x: lora(r=8 alpha=2)", ("AS101", 1, 13)),
    ("x: lora(r=)", ("AS101", 1, 11)),
    ("x@: lora", ("AS101", 1, 3)),
    ("layers[]: lora", ("AS101", 1, 8)),
    ("layers[a]: lora", ("AS101", 1, 8)),
    ("<>: lora", ("AS101", 1, 2)),
    ("defaults: lora", ("AS101", 1, 9)),
    ("adapterspec.x: lora", ("AS101", 1, 12)),
    ("adapterspec", ("AS101", 1, 12)),
    ("adapterspec 1 2", ("AS101", 1, 15)),
    ("e: tokens([1 2])", ("AS101", 1, 14)),
    ("e: tokens([1,,2])", ("AS101", 1, 14)),
    ("e: tokens([1:])", ("AS101", 1, 14)),
    ("e: tokens([1, 2)", ("AS104", 1, 16)),
])  # fmt: skip
def test_syntax_error_code_and_position(text, expected):
    assert errors(text) == [expected]


def test_keyword_error_says_how_to_select_such_a_module():
    (d,) = parse_text("defaults.x: lora", "t")[1]
    assert "keyword" in d.message and "**.defaults" in d.help


def test_space_error_suggests_the_missing_colon():
    (d,) = parse_text("q_proj lora(r=8)", "t")[1]
    assert "put ':' before it" in d.help and "'lora'" in d.help


def test_unexpected_invisible_character_is_named():
    (d,) = parse_text("q_proj:\u00a0lora", "t")[1]
    assert "U+00A0 NO-BREAK SPACE" in d.message


def test_every_bad_line_is_reported_and_good_lines_still_parse():
    tree, diagnostics = parse_text("a b: lora\nok: lora\nc: lora(\nalso_ok: none\n: x\n", "t")
    assert [(d.code, d.span.line) for d in diagnostics] == [("AS103", 1), ("AS104", 3), ("AS106", 5)]
    assert [i.selector.text for i in tree.items] == ["ok", "also_ok"]
    assert tree.failed_lines == [1, 3, 5]


def test_line_too_long_is_AS105():
    line = "q_proj: lora  # " + "x" * MAX_LINE_CHARS
    (d,) = parse_text(f"ok: lora\n{line}\n", "t")[1]
    assert (d.code, d.span.line, d.span.column) == ("AS105", 2, MAX_LINE_CHARS + 1)


def test_deeply_nested_alternations_are_one_diagnostic():
    (d,) = parse_text("<" * 2000 + "q" + ">" * 2000 + ": lora", "t")[1]
    assert (d.code, d.span.column) == ("AS107", 2)


def test_integer_beyond_pythons_digit_limit_is_a_diagnostic():
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(640)
    try:
        (d,) = parse_text(f"layers[{'9' * 1000}]: lora(r={'1' * 1000})", "t")[1]
    finally:
        sys.set_int_max_str_digits(limit)
    assert (d.code, d.message, d.span.column) == ("AS101", "number too large", 8)


# --- decoding ----------------------------------------------------------------------------------


def test_non_utf8_is_AS100_with_position():
    text, (d,) = decode(b"q: lora\nk\xff: lora\n", "t.aspec")
    assert text is None
    assert (d.code, d.span.line, d.span.column) == ("AS100", 2, 2)
    assert "0xff" in d.message


def test_binary_is_AS100():
    text, (d,) = decode(b"\x7fELF\x02\x01\x00\x00", "t.aspec")
    assert text is None and d.code == "AS100" and "binary" in d.message


def test_too_large_is_AS105_with_the_real_size():
    text, (d,) = decode(b"#" * 10, "t.aspec", size=10 * MAX_FILE_BYTES)
    assert text is None and d.code == "AS105" and f"{10 * MAX_FILE_BYTES:,}" in d.message


# --- the parser cache --------------------------------------------------------------------------


def parse_in_fresh_process(cache_home: Path) -> subprocess.CompletedProcess:
    code = "from adapterspec.language.parse import parse_text; print([d.code for d in parse_text('q lora')[1]])"
    env = dict(os.environ, XDG_CACHE_HOME=str(cache_home))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_parser_is_cached_and_survives_a_corrupt_or_unwritable_cache(tmp_path):
    first = parse_in_fresh_process(tmp_path)
    assert first.stdout.strip() == "['AS103']", first.stderr
    (cached,) = (tmp_path / "adapterspec").glob("parser-*.lark")
    good = cached.read_bytes()
    cached.write_bytes(good[: len(good) // 2])
    assert parse_in_fresh_process(tmp_path).stdout.strip() == "['AS103']"
    rebuilt = cached.read_bytes()
    assert len(rebuilt) > len(good) // 2 and rebuilt.split(b"\n")[0] == good.split(b"\n")[0]
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    result = parse_in_fresh_process(blocked)
    assert (result.stdout.strip(), result.stderr) == ("['AS103']", "")


def test_a_row_list_keeps_its_ranges_and_spans():
    tree, diagnostics = parse_text("e: tokens([5, 300:302], lr_scale=0.1)", "t")
    assert diagnostics == []
    (rows, scale) = tree.items[0].transform.arguments
    assert (rows.name, rows.value.ranges, rows.raw) == ("rows", ((5, 6), (300, 302)), "[5, 300:302]")
    assert (rows.value_span.column, rows.value_span.end_column) == (11, 23)
    assert (scale.name, scale.value) == ("lr_scale", 0.1)
    (named,) = parse_text("e: tokens(rows=[7])", "t")[0].items[0].transform.arguments
    assert (named.name, named.value.ranges, named.value_span.column) == ("rows", ((7, 8),), 16)
