"""Canonical layout of a spec (`adapterspec fmt`): the same lines, rules and comments, spelled one way."""

from __future__ import annotations

from typing import Optional

from . import syntax as ast
from .diagnostics import Diagnostic
from .parse import parse_text, strip_bom
from .validate import ARGUMENT_NAMES

TRAILING_COMMENT_GAP = "  "


def _argument_order(argument: ast.Argument) -> int:
    return ARGUMENT_NAMES.index(argument.name) if argument.name in ARGUMENT_NAMES else len(ARGUMENT_NAMES)


def transform_text(call: ast.TransformCall) -> str:
    """`lora(r=8, scale=2.0)`: arguments in the order r, scale, alpha, rslora, dropout, then unknown ones."""
    if call.arguments is None:
        return call.name
    arguments = sorted(call.arguments, key=_argument_order)
    return f"{call.name}({', '.join(ast.argument_text(a) for a in arguments)})"


def item_text(item: ast.Item) -> str:
    if isinstance(item, ast.VersionLine):
        return f"adapterspec {item.version}"
    if isinstance(item, ast.DefaultsLine):
        return f"defaults {transform_text(item.transform)}"
    type_filter = f"@{item.type_filter.name}" if item.type_filter else ""
    return f"{item.selector.text}{type_filter}: {transform_text(item.transform)}"


def format_tree(tree: ast.SpecTree) -> str:
    """The canonical text of a file that parsed without errors.

    One item or comment per line as written, no indentation, two spaces before a trailing comment,
    runs of blank lines collapsed to one (none at the start or the end), and a final newline.
    """
    items = {item.span.line: item for item in tree.items}
    comments = {comment.span.line: comment for comment in tree.comments}
    blank = set(tree.blank_lines)
    last_line = max([0, *items, *comments])
    out: list[str] = []
    blank_pending = False
    for line_no in range(1, last_line + 1):
        if line_no in blank:
            blank_pending = bool(out)
            continue
        item, comment = items.get(line_no), comments.get(line_no)
        if item is None and comment is None:
            continue
        if blank_pending:
            out.append("")
            blank_pending = False
        text = item_text(item) if item is not None else ""
        if comment is not None:
            text = f"{text}{TRAILING_COMMENT_GAP}{comment.text}" if text else comment.text
        out.append(text)
    return "".join(line + "\n" for line in out)


def format_source(text: str, filename: str = "<spec>") -> tuple[Optional[str], list[Diagnostic]]:
    """The canonical text, or None and the syntax errors (AS1xx) that keep a file from being formatted."""
    tree, diagnostics = parse_text(strip_bom(text), filename)
    if diagnostics:
        return None, diagnostics
    return format_tree(tree), []
