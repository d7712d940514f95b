"""Spec text → syntax tree with spans; the only module that touches Lark and its exceptions (AS1xx)."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from . import syntax as ast
from .diagnostics import Diagnostic, Severity, Span

MAX_FILE_BYTES = 1 << 20
MAX_LINE_CHARS = 4096

SELECTOR_TOKENS = frozenset(
    {"ROOT", "SEGNAME", "STAR", "DOUBLESTAR", "DOT", "LANGLE", "RANGLE", "LBRACKET", "RBRACKET", "AT"}
)

TERMINAL_WORDS = {
    "COLON": "':'",
    "DOT": "'.'",
    "COMMA": "','",
    "LPAR": "'('",
    "RPAR": "')'",
    "LBRACKET": "'['",
    "RBRACKET": "']'",
    "LANGLE": "'<'",
    "RANGLE": "'>'",
    "AT": "'@'",
    "EQUAL": "'='",
    "STAR": "'*'",
    "DOUBLESTAR": "'**'",
    "ROOT": "'/'",
    "SEGNAME": "a name",
    "WORD": "a name",
    "INT": "a number",
    "SIGNED_INT": "an integer",
    "SIGNED_NUMBER": "a number",
    "VERSION_KW": "'adapterspec'",
    "DEFAULTS_KW": "'defaults'",
    "$END": "end of line",
}


class _SelectorSpaces:
    """Post-lexer: drops spaces, but turns a space between two selector tokens into a GAP token.

    Spaces are allowed inside `[...]` and `<...>`; anywhere else inside a selector they are an
    error at the space itself, which is where a forgotten ':' usually is.
    """

    always_accept = ("WS",)

    def __init__(self):
        self.gap_next = ""
        self.gap_next_is_name = False
        self.recent: list[str] = []

    def process(self, stream):
        previous = None
        pending_space = None
        depth = 0
        self.recent = []
        for token in stream:
            if token.type == "WS":
                pending_space = token
                continue
            if (
                pending_space is not None
                and depth == 0
                and previous is not None
                and previous.type in SELECTOR_TOKENS
                and token.type in SELECTOR_TOKENS | {"WORD"}
            ):
                self.gap_next = str(token)
                self.gap_next_is_name = token.type in ("SEGNAME", "WORD")
                yield Token.new_borrow_pos("GAP", pending_space.value, pending_space)
                return
            pending_space = None
            if token.type in ("LBRACKET", "LANGLE"):
                depth += 1
            elif token.type in ("RBRACKET", "RANGLE"):
                depth = max(0, depth - 1)
            previous = token
            self.recent = [self.recent[-1], token.type] if self.recent else [token.type]
            yield token


def grammar_text() -> str:
    packaged = Path(__file__).parent / "_grammar" / "adapterspec.lark"
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).parent.parent / "grammar" / "adapterspec.lark").read_text(encoding="utf-8")


class _Comments:
    def __init__(self):
        self.found: list[Token] = []

    def __call__(self, token: Token) -> Token:
        self.found.append(token)
        return token


_comments = _Comments()
_selector_spaces = _SelectorSpaces()


@lru_cache(maxsize=1)
def line_parser() -> Lark:
    text = grammar_text().replace("%ignore /[ \\t\\f\\r]+/", "WS: /[ \\t\\f\\r]+/")
    return Lark(
        text,
        parser="lalr",
        lexer="contextual",
        postlex=_selector_spaces,
        maybe_placeholders=True,
        lexer_callbacks={"COMMENT": _comments},
    )


def _diag(code: str, message: str, span: Span | None, help: str | None = None, filename: str = "<spec>") -> Diagnostic:
    return Diagnostic(code, Severity.ERROR, message, span, help, filename)


def decode(data: bytes, filename: str) -> tuple[str | None, list[Diagnostic]]:
    """Bytes → text, or an AS100/AS105 diagnostic for binary, non-UTF-8 or oversized input."""
    if len(data) > MAX_FILE_BYTES:
        return None, [
            _diag(
                "AS105",
                f"file is too large ({len(data):,} bytes; a spec may have at most {MAX_FILE_BYTES:,})",
                None,
                "a spec is a short list of rules; is this the right file?",
                filename,
            )
        ]
    if b"\x00" in data:
        offset = data.index(b"\x00")
        text = data[:offset].decode("utf-8", "replace")
        return None, [
            _diag("AS100", "file is binary (it contains a NUL byte)", Span.at(text, len(text), len(text) + 1),
                  "adapterspec reads UTF-8 text files (.aspec)", filename)
        ]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        prefix = data[: error.start].decode("utf-8", "replace")
        return None, [
            _diag(
                "AS100",
                f"file is not valid UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start})",
                Span.at(prefix, len(prefix), len(prefix) + 1),
                "save the file as UTF-8",
                filename,
            )
        ]
    if text.startswith("\ufeff"):
        text = text[1:]
    return text, []


class _LineConverter:
    """Turns one line's Lark tree into syntax nodes, shifting token positions by the line's offset."""

    def __init__(self, line_no: int, offset: int):
        self.line_no = line_no
        self.offset = offset

    def span(self, start: int, end: int) -> Span:
        return Span(self.line_no, start + 1, self.line_no, end + 1, self.offset + start, self.offset + end)

    def tspan(self, token: Token) -> Span:
        return self.span(token.start_pos, token.end_pos)

    def tree_span(self, tree: Tree | Token) -> Span:
        tokens = [tree] if isinstance(tree, Token) else [t for t in tree.scan_values(lambda v: isinstance(v, Token))]
        return self.span(min(t.start_pos for t in tokens), max(t.end_pos for t in tokens))

    def item(self, tree: Tree) -> ast.Item:
        handler = getattr(self, tree.data)
        return handler(tree)

    def version(self, tree: Tree) -> ast.VersionLine:
        return ast.VersionLine(int(tree.children[1]), self.tree_span(tree))

    def defaults(self, tree: Tree) -> ast.DefaultsLine:
        return ast.DefaultsLine(self.transform(tree.children[1]), self.tree_span(tree))

    def rule(self, tree: Tree) -> ast.RuleLine:
        selector_tree, type_tree, _colon, transform_tree = tree.children
        type_filter = None
        if type_tree is not None:
            name = type_tree.children[1]
            type_filter = ast.TypeFilter(str(name), self.tree_span(type_tree))
        return ast.RuleLine(
            self.selector(selector_tree), type_filter, self.transform(transform_tree), self.tree_span(tree)
        )

    def selector(self, tree: Tree) -> ast.Selector:
        anchored = isinstance(tree.children[0], Token) and tree.children[0].type == "ROOT"
        segments = tuple(self.segment(c) for c in tree.children if isinstance(c, Tree))
        span = self.tree_span(tree)
        tokens = sorted(tree.scan_values(lambda v: isinstance(v, Token)), key=lambda t: t.start_pos)
        text = "".join(str(t) if t.type not in ("COMMA",) else "," for t in tokens)
        return ast.Selector(anchored, segments, span, text)

    def segment(self, tree: Tree) -> ast.Segment:
        if tree.data == "deep_segment":
            return ast.DeepSegment(self.tree_span(tree))
        children = list(tree.children)
        index = None
        if children and isinstance(children[-1], Tree) and children[-1].data == "index":
            index = self.index(children.pop())
        elif children and children[-1] is None:
            children.pop()
        pieces = tuple(self.piece(c) for c in children)
        return ast.NameSegment(pieces, index, self.tree_span(tree))

    def piece(self, tree: Tree) -> ast.Piece:
        if tree.data == "literal":
            return ast.Literal(str(tree.children[0]), self.tree_span(tree))
        if tree.data == "star":
            return ast.Star(self.tree_span(tree))
        options = []
        for alternative in tree.children:
            if isinstance(alternative, Tree) and alternative.data == "alternative":
                parts = tuple(
                    ast.Star(self.tspan(t)) if t.type == "STAR" else ast.Literal(str(t), self.tspan(t))
                    for t in alternative.children
                )
                options.append(parts)
        return ast.Alternation(tuple(options), self.tree_span(tree))

    def index(self, tree: Tree) -> ast.Index:
        body = tree.children[1]
        span = self.tree_span(tree)
        if body.data == "index_all":
            return ast.IndexAll(span)
        if body.data == "index_list":
            return ast.IndexList(tuple(int(t) for t in body.children if t.type == "SIGNED_INT"), span)
        values: list[int | None] = []
        current: int | None = None
        for child in body.children:
            if isinstance(child, Token) and child.type == "COLON":
                values.append(current)
                current = None
            elif child is not None:
                current = int(child)
        values.append(current)
        values += [None] * (3 - len(values))
        return ast.IndexSlice(values[0], values[1], values[2], span)

    def transform(self, tree: Tree) -> ast.TransformCall:
        name = tree.children[0]
        arguments_tree = tree.children[1] if len(tree.children) > 1 else None
        arguments = None
        if arguments_tree is not None:
            arguments = tuple(self.argument(a) for a in arguments_tree.children if isinstance(a, Tree))
        return ast.TransformCall(str(name), self.tspan(name), arguments, self.tree_span(tree))

    def argument(self, tree: Tree) -> ast.Argument:
        name, _eq, value_tree = tree.children
        token = value_tree.children[0]
        raw = str(token)
        value: int | float | str
        if value_tree.data == "number":
            value = int(raw) if re.fullmatch(r"[+-]?\d+", raw) else float(raw)
        else:
            value = raw
        return ast.Argument(str(name), self.tspan(name), raw, value, self.tspan(token), self.tree_span(tree))


def _expected_words(expected) -> str:
    words = sorted({TERMINAL_WORDS.get(name, name) for name in expected if name not in ("WS", "COMMENT")})
    return ", ".join(words)


def _syntax_diagnostic(error: UnexpectedInput, line_no: int, offset: int, line: str, filename: str) -> Diagnostic:
    column = error.column if isinstance(error.column, int) and error.column > 0 else len(line) + 1
    if isinstance(error, UnexpectedCharacters):
        start = error.pos_in_stream
        char = line[start] if start < len(line) else ""
        span = Span(line_no, start + 1, line_no, start + 2, offset + start, offset + start + 1)
        help_text = None
        if char == "-":
            help_text = "module names contain letters, digits and '_'; negative numbers appear only inside [...]"
        elif char in "'\"":
            help_text = "values are written without quotes: lora(r=8, rslora=true)"
        elif char == "\t":
            help_text = None
        expected = _expected_words(error.allowed or ())
        message = f"unexpected character {char!r}"
        if expected:
            message += f"; expected {expected}"
        return _diag("AS101", message, span, help_text, filename)

    assert isinstance(error, UnexpectedToken)
    token = error.token
    expected = set(error.expected or ())
    if token.type == "GAP":
        start = token.start_pos
        span = Span(line_no, start + 1, line_no, start + 1 + len(token.value), offset + start, offset + start + len(token.value))
        nxt = _selector_spaces.gap_next
        help_text = "a selector contains no spaces outside [...] and <...>; remove the space"
        if _selector_spaces.gap_next_is_name:
            help_text += f", or, if '{nxt}' begins the transform, put ':' before it"
        return _diag("AS103", "space inside a selector", span, help_text, filename)
    if token.type == "$END":
        start = len(line.rstrip())
        end_span = Span(line_no, start + 1, line_no, start + 2, offset + start, offset + start + 1)
        for closer, opener in (("RPAR", "("), ("RBRACKET", "["), ("RANGLE", "<")):
            if closer in expected:
                return _diag("AS104", f"'{opener}' is not closed before the end of the line", end_span,
                             f"add the missing '{TERMINAL_WORDS[closer][1]}'", filename)
        if "COLON" in expected:
            return _diag("AS102", "expected ':' and a transform after the selector", end_span,
                         "a rule reads SELECTOR: TRANSFORM, e.g. 'self_attn.q_proj: lora(r=8)'", filename)
        if "WORD" in expected:
            return _diag("AS106", "missing transform", end_span,
                         "write one of lora, dora, full, none", filename)
        return _diag("AS101", f"unexpected end of line; expected {_expected_words(expected)}", end_span, None, filename)

    start = token.start_pos
    span = Span(line_no, start + 1, line_no, start + 1 + len(token.value), offset + start, offset + start + len(token.value))
    for closer, opener in (("RBRACKET", "["), ("RANGLE", "<"), ("RPAR", "(")):
        if closer in expected and token.type not in ("COMMA", "COLON", "SIGNED_INT", "STAR", "SEGNAME", "WORD"):
            return _diag("AS104", f"'{opener}' is not closed", span, f"add the missing '{TERMINAL_WORDS[closer][1]}'", filename)
    if token.type == "COLON" and "RBRACKET" not in expected and "SEGNAME" in expected:
        return _diag("AS106", "a selector must not be empty", span, "write a module path before ':', e.g. 'q_proj: lora'", filename)
    recent = _selector_spaces.recent
    follows_deep = bool(recent) and recent[-1] == "DOUBLESTAR" and token.type in ("SEGNAME", "WORD", "STAR", "LANGLE")
    if token.type == "DOUBLESTAR" or follows_deep:
        return _diag("AS107", "'**' must stand alone as a whole segment", span,
                     "write '**.*_proj' rather than '**_proj'", filename)
    if token.type == "DOT" and "SEGNAME" in expected:
        return _diag("AS107", "empty segment in a selector", span, "remove the extra '.'", filename)
    if token.type == "LANGLE" and "SEGNAME" in expected and "COMMA" in expected | {"COMMA"}:
        return _diag("AS107", "alternations do not nest", span,
                     "list every alternative once: '<q,k,v>_proj'", filename)
    if "RBRACKET" in expected:
        return _diag("AS104", "'[' is not closed", span, "an index reads [*], [3], [-1], [0:8], [::2] or [0,5,9]", filename)
    if "COLON" in expected and token.type in ("WORD", "SEGNAME", "LPAR"):
        return _diag("AS102", f"expected ':' before {token.value!r}", span,
                     "a rule reads SELECTOR: TRANSFORM, e.g. 'self_attn.q_proj: lora(r=8)'", filename)
    return _diag("AS101", f"unexpected {token.value!r}; expected {_expected_words(expected)}", span, None, filename)


def parse_text(text: str, filename: str = "<spec>") -> tuple[ast.SpecTree, list[Diagnostic]]:
    """Parse every line; a syntax error on one line never hides the others."""
    tree = ast.SpecTree(source=text, filename=filename)
    diagnostics: list[Diagnostic] = []
    parser = line_parser()
    offset = 0
    for line_no, raw_line in enumerate(text.split("\n"), start=1):
        line = raw_line[:-1] if raw_line.endswith("\r") else raw_line
        line_offset = offset
        offset += len(raw_line) + 1
        if not line.strip():
            tree.blank_lines.append(line_no)
            continue
        if len(line) > MAX_LINE_CHARS:
            span = Span(line_no, MAX_LINE_CHARS + 1, line_no, len(line) + 1, line_offset + MAX_LINE_CHARS, line_offset + len(line))
            diagnostics.append(_diag("AS105", f"line is too long ({len(line):,} characters; at most {MAX_LINE_CHARS:,})",
                                     span, "split it into several rules", filename))
            continue
        _comments.found = []
        converter = _LineConverter(line_no, line_offset)
        try:
            parsed = parser.parse(line)
        except UnexpectedInput as error:
            diagnostics.append(_syntax_diagnostic(error, line_no, line_offset, line, filename))
            continue
        finally:
            comments = _comments.found
            _comments.found = []
        code_seen = bool(parsed.children) and parsed.children[0] is not None
        for token in comments:
            tree.comments.append(ast.Comment(str(token), converter.tspan(token), trailing=code_seen))
        if code_seen:
            tree.items.append(converter.item(parsed.children[0]))
    return tree, diagnostics
