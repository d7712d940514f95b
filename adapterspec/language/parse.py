"""Spec text → syntax tree with spans; the only module that touches Lark and its exceptions (AS1xx)."""

from __future__ import annotations

import hashlib
import re
import threading
import unicodedata
from functools import lru_cache
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from ..cache import cache_dir
from . import syntax as ast
from .codes import diagnostic
from .diagnostics import Diagnostic, Span

MAX_FILE_BYTES = 1 << 20
MAX_LINE_CHARS = 4096
# Far beyond any spec written by hand, and what keeps lint and the planner within seconds.
MAX_LINES = 10_000
WHITESPACE = " \t\f\r"

SELECTOR_TOKENS = frozenset(
    {"ROOT", "SEGNAME", "STAR", "DOUBLESTAR", "DOT", "LANGLE", "RANGLE", "LBRACKET", "RBRACKET", "AT"}
)
KEYWORDS = {"DEFAULTS_KW": "defaults", "VERSION_KW": "adapterspec"}
CLOSERS = {"RPAR": ("(", ")"), "RBRACKET": ("[", "]"), "RANGLE": ("<", ">")}
OPENERS = {"LPAR": "(", "LBRACKET": "[", "LANGLE": "<"}
BRACKET_PAIRS = {"(": ")", "[": "]", "<": ">"}
NAME_TOKENS = frozenset({"SEGNAME", "WORD"})
ALTERNATIVE_TOKENS = frozenset({"SEGNAME", "WORD", "STAR"})

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
    "$END": "the end of the line",
}

RULE_HELP = "a rule reads SELECTOR: TRANSFORM, e.g. 'self_attn.q_proj: lora(r=8)'"
INDEX_HELP = "an index reads [*], [3], [-1], [0:8], [-4:], [::2] or [0,5,9]"
ROWS_HELP = "a row list reads [32000, 32001] or [32000:32008] (rows separated by ',')"


class _LineScanner:
    """Post-lexer for one line: drops spaces and comments (keeping the comments), remembers the
    tokens it passed on, and turns a space between two selector tokens into a GAP token, which no
    grammar rule accepts. Spaces are allowed inside `[...]` and `<...>`."""

    always_accept = ("WS", "COMMENT")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.comments: list[Token] = []
        self.passed: list[Token] = []
        self.gap_next: Token | None = None
        self.gap_in_alternation = False

    def process(self, stream):
        pending_space = None
        brackets = 0
        angles = 0
        for token in stream:
            if token.type == "COMMENT":
                self.comments.append(token)
                continue
            if token.type == "WS":
                pending_space = token
                continue
            previous = self.passed[-1] if self.passed else None
            if pending_space is not None and previous is not None and self.splits(previous, token, brackets, angles):
                self.gap_next = token
                self.gap_in_alternation = angles > 0
                yield Token.new_borrow_pos("GAP", pending_space.value, pending_space)
                return
            pending_space = None
            brackets += {"LBRACKET": 1, "RBRACKET": -1}.get(token.type, 0)
            angles += {"LANGLE": 1, "RANGLE": -1}.get(token.type, 0)
            self.passed.append(token)
            yield token

    @staticmethod
    def splits(previous: Token, token: Token, brackets: int, angles: int) -> bool:
        """Whether a space between these two tokens cuts a selector (or one alternative) in two."""
        if angles > 0:
            return previous.type in ALTERNATIVE_TOKENS and token.type in ALTERNATIVE_TOKENS
        if brackets > 0:
            return False
        return previous.type in SELECTOR_TOKENS and token.type in SELECTOR_TOKENS | NAME_TOKENS


def grammar_text() -> str:
    package = Path(__file__).parent.parent
    packaged = package / "_grammar" / "adapterspec.lark"
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (package.parent / "grammar" / "adapterspec.lark").read_text(encoding="utf-8")


def _cache_file(grammar: str) -> str | None:
    """Where the analysed parser is kept between runs (it loads ~7× faster than it builds)."""
    directory = cache_dir()
    if directory is None:
        return None
    digest = hashlib.sha256(grammar.encode("utf-8")).hexdigest()[:16]
    return str(directory / f"parser-{digest}.lark")


_scanner = _LineScanner()
_parse_lock = threading.Lock()


@lru_cache(maxsize=1)
def line_parser() -> Lark:
    grammar = grammar_text()
    options = dict(parser="lalr", lexer="contextual", postlex=_scanner, maybe_placeholders=True)
    cache = _cache_file(grammar)
    if cache is not None:
        # Lark checks the cached file against a hash of the grammar and its own version, and
        # builds afresh (overwriting it) when the file is stale, unreadable or corrupt.
        return Lark(grammar, cache=cache, **options)
    return Lark(grammar, **options)


def _error(code: str, message: str, span: Span | None, help: str | None = None, filename: str = "<spec>") -> Diagnostic:
    return diagnostic(code, message, span, help, filename)


def decode(data: bytes, filename: str, size: int | None = None) -> tuple[str | None, list[Diagnostic]]:
    """Bytes → text, or an AS100/AS105 diagnostic for binary, non-UTF-8 or oversized input.

    `size` is the file's full size when `data` holds only its beginning.
    """
    size = max(size or 0, len(data))
    if size > MAX_FILE_BYTES:
        message = f"file is too large ({size:,} bytes; a spec may have at most {MAX_FILE_BYTES:,})"
        return None, [
            _error("AS105", message, None, "a spec is a short list of rules; is this the right file?", filename)
        ]
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding = "UTF-32" if data.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")) else "UTF-16"
        return None, [
            _error(
                "AS100", f"file is {encoding}, not UTF-8", Span(1, 1, 1, 1, 0, 0), "save the file as UTF-8", filename
            )
        ]
    if b"\x00" in data:
        prefix = data[: data.index(b"\x00")].decode("utf-8", "replace")
        span = Span.at(prefix + " ", len(prefix), len(prefix) + 1)
        return None, [
            _error(
                "AS100",
                "file is binary (it contains a NUL byte)",
                span,
                "adapterspec reads UTF-8 text files (.aspec)",
                filename,
            )
        ]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        prefix = data[: error.start].decode("utf-8", "replace")
        span = Span.at(prefix + " ", len(prefix), len(prefix) + 1)
        message = f"file is not valid UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start})"
        return None, [_error("AS100", message, span, "save the file as UTF-8", filename)]
    return strip_bom(text), []


def strip_bom(text: str) -> str:
    return text[1:] if text.startswith("\ufeff") else text


class _NumberTooLarge(Exception):
    def __init__(self, token: Token):
        self.token = token


def _integer(token: Token) -> int:
    try:
        return int(token)
    except ValueError:
        raise _NumberTooLarge(token) from None


def _edge_token(node: Tree | Token, end: int) -> Token:
    """The first (end=0) or last (end=-1) token of a subtree, skipping empty optional parts."""
    step = 1 if end == 0 else -1
    while isinstance(node, Tree):
        children = node.children
        position = end
        while children[position] is None:
            position += step
        node = children[position]
    return node


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
        return self.span(_edge_token(tree, 0).start_pos, _edge_token(tree, -1).end_pos)

    def item(self, tree: Tree) -> ast.Item:
        return getattr(self, tree.data)(tree)

    def version(self, tree: Tree) -> ast.VersionLine:
        return ast.VersionLine(_integer(tree.children[1]), self.tree_span(tree))

    def defaults(self, tree: Tree) -> ast.DefaultsLine:
        return ast.DefaultsLine(self.transform(tree.children[1]), self.tree_span(tree))

    def rule(self, tree: Tree) -> ast.RuleLine:
        selector_tree, type_tree, _colon, transform_tree = tree.children
        type_filter = None
        if type_tree is not None:
            type_filter = ast.TypeFilter(str(type_tree.children[1]), self.tree_span(type_tree))
        return ast.RuleLine(
            self.selector(selector_tree), type_filter, self.transform(transform_tree), self.tree_span(tree)
        )

    def selector(self, tree: Tree) -> ast.Selector:
        anchored = isinstance(tree.children[0], Token) and tree.children[0].type == "ROOT"
        segments = tuple(self.segment(c) for c in tree.children if isinstance(c, Tree))
        return ast.Selector(anchored, segments, self.tree_span(tree), ast.selector_text(anchored, segments))

    def segment(self, tree: Tree) -> ast.Segment:
        if tree.data == "deep_segment":
            return ast.DeepSegment(self.tree_span(tree))
        children = list(tree.children)
        last = children.pop()
        index = self.index(last) if last is not None else None
        pieces = tuple(self.piece(c) for c in children)
        return ast.NameSegment(pieces, index, self.tree_span(tree))

    def piece(self, tree: Tree) -> ast.Piece:
        if tree.data == "literal":
            return ast.Literal(str(tree.children[0]), self.tree_span(tree))
        if tree.data == "star":
            return ast.Star(self.tree_span(tree))
        options = []
        for alternative in tree.children:
            if isinstance(alternative, Tree):
                options.append(
                    tuple(
                        ast.Star(self.tspan(t)) if t.type == "STAR" else ast.Literal(str(t), self.tspan(t))
                        for t in alternative.children
                    )
                )
        return ast.Alternation(tuple(options), self.tree_span(tree))

    def index(self, tree: Tree) -> ast.Index:
        body = tree.children[1]
        span = self.tree_span(tree)
        if body.data == "index_all":
            return ast.IndexAll(span)
        if body.data == "index_list":
            return ast.IndexList(tuple(_integer(t) for t in body.children if t.type == "SIGNED_INT"), span)
        bounds: list[int | None] = []
        current: int | None = None
        for child in body.children:
            if isinstance(child, Token) and child.type == "COLON":
                bounds.append(current)
                current = None
            elif child is not None:
                current = _integer(child)
        bounds.append(current)
        bounds += [None] * (3 - len(bounds))
        return ast.IndexSlice(bounds[0], bounds[1], bounds[2], span)

    def transform(self, tree: Tree) -> ast.TransformCall:
        name, arguments_tree = tree.children
        arguments = None
        if arguments_tree is not None:
            arguments = tuple(self.argument(a) for a in arguments_tree.children if isinstance(a, Tree))
        return ast.TransformCall(str(name), self.tspan(name), arguments, self.tree_span(tree))

    def argument(self, tree: Tree) -> ast.Argument:
        if tree.data == "positional_argument":
            rows = self.row_list(tree.children[0])
            span = self.tree_span(tree)
            return ast.Argument("rows", span, rows.text, rows, span, span)
        name, _equal, value_tree = tree.children
        if value_tree.data == "row_list":
            rows = self.row_list(value_tree)
            return ast.Argument(
                str(name), self.tspan(name), rows.text, rows, self.tree_span(value_tree), self.tree_span(tree)
            )
        token = value_tree.children[0]
        raw = str(token)
        value: int | float | str
        if value_tree.data == "word":
            value = raw
        elif re.fullmatch(r"[+-]?\d+", raw):
            value = _integer(token)
        else:
            value = float(raw)
        return ast.Argument(str(name), self.tspan(name), raw, value, self.tspan(token), self.tree_span(tree))

    def row_list(self, tree: Tree) -> ast.RowList:
        ranges = []
        for item in tree.children:
            if isinstance(item, Tree):
                numbers = [_integer(t) for t in item.children if isinstance(t, Token) and t.type == "SIGNED_INT"]
                ranges.append((numbers[0], numbers[1] if len(numbers) > 1 else numbers[0] + 1))
        return ast.RowList(tuple(ranges))


def describe_char(char: str) -> str:
    """`'x'`, or for an invisible or non-ASCII character also its code point and name."""
    if char.isascii() and char.isprintable():
        return repr(char)
    name = unicodedata.name(char, "")
    shown = repr(char) if char.isprintable() else f"'\\u{ord(char):04x}'"
    return f"{shown} (U+{ord(char):04X}{' ' + name if name else ''})"


def _expected_words(expected) -> str:
    words = sorted({TERMINAL_WORDS.get(name, name) for name in expected if name not in ("WS", "COMMENT")})
    return ", ".join(words)


class _SyntaxErrorReport:
    """Turns one Lark exception on one line into the most helpful AS1xx diagnostic."""

    def __init__(self, line: str, line_no: int, offset: int, filename: str, scanner: _LineScanner):
        self.line = line
        self.line_no = line_no
        self.offset = offset
        self.filename = filename
        self.passed = [t.type for t in scanner.passed]
        self.last_end = scanner.passed[-1].end_pos if scanner.passed else 0
        self.gap_next = scanner.gap_next
        self.gap_in_alternation = scanner.gap_in_alternation

    def span(self, start: int, end: int) -> Span:
        end = max(end, start + 1)
        return Span(self.line_no, start + 1, self.line_no, end + 1, self.offset + start, self.offset + end)

    def error(self, code: str, message: str, span: Span, help: str | None = None) -> Diagnostic:
        return _error(code, message, span, help, self.filename)

    def diagnostic(self, error: UnexpectedInput) -> Diagnostic:
        if isinstance(error, UnexpectedCharacters):
            return self.unexpected_character(error)
        assert isinstance(error, UnexpectedToken)
        if error.token.type == "GAP":
            return self.gap(error.token)
        if error.token.type == "$END":
            return self.early_end(set(error.expected or ()))
        return self.unexpected_token(error.token, set(error.expected or ()))

    def unexpected_character(self, error: UnexpectedCharacters) -> Diagnostic:
        start = error.pos_in_stream
        char = self.line[start] if start < len(self.line) else ""
        help_text = None
        if char == "-":
            help_text = "module names contain letters, digits and '_'; a negative number appears only inside [...] or as a value"
        elif char in "'\"":
            help_text = "values are written without quotes: lora(r=8, rslora=true)"
        elif char in "{}":
            help_text = "alternatives are written in angle brackets: '<q,k,v>_proj'"
        elif not char.isascii():
            help_text = "module names, transforms and arguments are ASCII; non-ASCII text belongs in comments"
        message = f"unexpected character {describe_char(char)}"
        expected = _expected_words(error.allowed or ())
        if expected:
            message += f"; expected {expected}"
        return self.error("AS101", message, self.span(start, start + 1), help_text)

    def gap(self, token: Token) -> Diagnostic:
        help_text = "a selector contains no spaces outside [...] and <...>; remove the space"
        if self.gap_in_alternation:
            help_text = "an alternative is one name: remove the space, or separate alternatives with ','"
        following = self.gap_next
        if following is not None and following.type in NAME_TOKENS and not self.gap_in_alternation:
            help_text += f", or, if '{following}' begins the transform, put ':' before it"
        start = token.start_pos
        return self.error("AS103", "space inside a selector", self.span(start, start + len(token.value)), help_text)

    def keyword_misuse(self, token_span: Span) -> Diagnostic | None:
        if len(self.passed) != 1 or self.passed[0] not in KEYWORDS:
            return None
        word = KEYWORDS[self.passed[0]]
        return self.error(
            "AS101",
            f"'{word}' at the start of a line is a keyword, not a module name",
            token_span,
            f"to select a module named '{word}', write '**.{word}' (or a path from the root: '/model.{word}')",
        )

    def early_end(self, expected: set[str]) -> Diagnostic:
        expected = expected - {"WS", "COMMENT"}
        start = self.last_end
        span = Span(self.line_no, start + 1, self.line_no, start + 1, self.offset + start, self.offset + start)
        last = self.passed[-1] if self.passed else None
        for closer, (opener, close) in CLOSERS.items():
            if closer in expected:
                return self.error(
                    "AS104", f"'{opener}' is not closed before the end of the line", span, f"add the missing '{close}'"
                )
        if last == "DOT":
            return self.error(
                "AS107", "a selector must not end with '.'", span, "remove the '.' or add a segment after it"
            )
        if last == "AT":
            return self.error(
                "AS101", "missing type after '@'", span, "use @linear, @switch, @embedding or a class name"
            )
        if last == "ROOT":
            return self.error(
                "AS106", "a selector must not be empty", span, "write a module path after '/', e.g. '/lm_head: lora'"
            )
        if last == "DEFAULTS_KW":
            return self.error(
                "AS106",
                "missing transform after 'defaults'",
                span,
                "a defaults line reads 'defaults lora(r=8, scale=20.0)'",
            )
        if last == "VERSION_KW":
            return self.error("AS101", "missing version number", span, "the version line reads 'adapterspec 1'")
        if last == "EQUAL":
            return self.error("AS101", "missing value after '='", span, "for example r=8")
        if "COLON" in expected:
            return self.error("AS102", "expected ':' and a transform after the selector", span, RULE_HELP)
        if last == "COLON":
            return self.error("AS106", "missing transform", span, "write one of lora, dora, full, none")
        return self.error("AS101", f"unexpected end of line; expected {_expected_words(expected)}", span)

    def open_bracket(self) -> str | None:
        """The innermost bracket that is open where the error is: '(', '[', '<' or None."""
        stack: list[str] = []
        for kind in self.passed:
            if kind in OPENERS:
                stack.append(OPENERS[kind])
            elif kind in CLOSERS and stack:
                stack.pop()
        return stack[-1] if stack else None

    def unexpected_token(self, token: Token, expected: set[str]) -> Diagnostic:
        expected = expected - {"WS", "COMMENT"}
        kind = "NAME" if token.type in NAME_TOKENS else token.type
        start = token.start_pos
        span = self.span(start, start + len(token.value))
        last = self.passed[-1] if self.passed else None
        shown = f"'{token.value}'"
        bracket = self.open_bracket()
        closed_later = bracket is not None and BRACKET_PAIRS[bracket] in self.line[start:]
        misuse = self.keyword_misuse(span)
        if misuse is not None:
            return misuse
        if last == "EQUAL":
            return self.error("AS101", "missing value after '='", span, "for example r=8")
        if kind == "COLON" and last in (None, "ROOT"):
            return self.error(
                "AS106", "a selector must not be empty", span, "write a module path before ':', e.g. 'q_proj: lora'"
            )
        if kind == "DOUBLESTAR" or (last == "DOUBLESTAR" and kind in ("NAME", "STAR", "LANGLE", "LBRACKET")):
            return self.error(
                "AS107",
                "'**' must stand alone as a whole segment",
                span,
                "write '**.*_proj' rather than '**_proj'; '**' takes no index",
            )
        if kind in ("DOT", "COLON", "AT") and last in (None, "DOT", "ROOT"):
            return self.error("AS107", "empty segment in a selector", span, "remove the extra '.'")
        if kind in ("COLON", "DOT") and last == "AT":
            return self.error(
                "AS101", "missing type after '@'", span, "use @linear, @switch, @embedding or a class name"
            )
        if bracket == "<" and kind == "LANGLE":
            return self.error("AS107", "alternations do not nest", span, "list every alternative once: '<q,k,v>_proj'")
        if kind == "RBRACKET" and last == "LBRACKET":
            return self.error("AS101", "empty index '[]'", span, INDEX_HELP)
        if kind == "RANGLE" and last in ("LANGLE", "COMMA"):
            return self.error(
                "AS101", "empty alternative in '<...>'", span, "write '<q,k,v>_proj': every alternative is a name"
            )
        if bracket is not None and not closed_later:
            return self.error(
                "AS104", f"'{bracket}' is not closed", span, f"add the missing '{BRACKET_PAIRS[bracket]}'"
            )
        if bracket == "[" and "LPAR" in self.passed:
            return self.error("AS101", f"unexpected {shown} in a row list", span, ROWS_HELP)
        if bracket == "[":
            return self.error("AS101", f"unexpected {shown} in an index", span, INDEX_HELP)
        if bracket == "<":
            return self.error(
                "AS101",
                f"unexpected {shown} in an alternation",
                span,
                "an alternation lists names and '*' between ',': '<q,k,v>_proj'",
            )
        if bracket == "(" and kind in ("NAME", "SIGNED_NUMBER") and last not in ("LPAR", "COMMA", "EQUAL"):
            return self.error("AS101", f"expected ',' or ')' before {shown}", span, "arguments are separated by ','")
        if "COLON" in expected and kind in ("NAME", "LPAR"):
            return self.error("AS102", f"expected ':' before {shown}", span, RULE_HELP)
        if not expected:
            return self.error(
                "AS101",
                f"unexpected {shown}: the line is already complete",
                span,
                "one rule per line; a comment starts with '#'",
            )
        return self.error("AS101", f"unexpected {shown}; expected {_expected_words(expected)}", span)


def _comment(converter: _LineConverter, token: Token, trailing: bool) -> ast.Comment:
    text = str(token).rstrip()
    return ast.Comment(text, converter.span(token.start_pos, token.start_pos + len(text)), trailing)


def _parse_line(parser: Lark, tree: ast.SpecTree, line: str, line_no: int, offset: int) -> Diagnostic | None:
    converter = _LineConverter(line_no, offset)
    stripped = line.lstrip(WHITESPACE)
    if stripped.startswith("#"):
        start = len(line) - len(stripped)
        tree.comments.append(_comment(converter, Token("COMMENT", stripped, start, end_pos=len(line)), False))
        return None
    _scanner.reset()
    try:
        parsed = parser.parse(line)
        item = converter.item(parsed.children[0]) if parsed.children[0] is not None else None
    except UnexpectedInput as error:
        return _SyntaxErrorReport(line, line_no, offset, tree.filename, _scanner).diagnostic(error)
    except _NumberTooLarge as error:
        token = error.token
        return _error("AS101", "number too large", converter.tspan(token), None, tree.filename)
    for token in _scanner.comments:
        tree.comments.append(_comment(converter, token, item is not None))
    if item is not None:
        tree.items.append(item)
    return None


def parse_text(text: str, filename: str = "<spec>") -> tuple[ast.SpecTree, list[Diagnostic]]:
    """Parse every line; a syntax error on one line never hides the others."""
    tree = ast.SpecTree(source=text, filename=filename)
    lines = text.split("\n")
    count = len(lines) - (lines[-1] == "")
    if count > MAX_LINES:
        tree.failed_lines.append(MAX_LINES + 1)
        message = f"the spec has too many lines ({count:,}; a spec may have at most {MAX_LINES:,})"
        help_text = "a spec is a short list of rules: '**', '<a,b>' and 'layers[i:j]' select many modules in one rule"
        return tree, [_error("AS105", message, Span(MAX_LINES + 1, 1, MAX_LINES + 1, 1), help_text, filename)]
    diagnostics: list[Diagnostic] = []
    parser = line_parser()
    offset = 0
    with _parse_lock:
        for line_no, raw_line in enumerate(lines, start=1):
            line = raw_line[:-1] if raw_line.endswith("\r") else raw_line
            line_offset = offset
            offset += len(raw_line) + 1
            if not line.strip(WHITESPACE):
                tree.blank_lines.append(line_no)
                continue
            if len(line) > MAX_LINE_CHARS:
                span = Span(
                    line_no,
                    MAX_LINE_CHARS + 1,
                    line_no,
                    len(line) + 1,
                    line_offset + MAX_LINE_CHARS,
                    line_offset + len(line),
                )
                message = f"line is too long ({len(line):,} characters; at most {MAX_LINE_CHARS:,})"
                diagnostic = _error("AS105", message, span, "split it into several rules", filename)
            else:
                diagnostic = _parse_line(parser, tree, line, line_no, line_offset)
            if diagnostic is not None:
                diagnostics.append(diagnostic)
                tree.failed_lines.append(line_no)
    return tree, diagnostics
