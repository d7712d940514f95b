"""Selectors compiled to matchers over a module tree: a small automaton walked over dotted paths."""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from functools import lru_cache

from ..language import syntax as ast
from .blocks import BLOCKS_ALIAS, block_lists


@dataclass(frozen=True)
class Step:
    kind: str  # "deep" | "name" | "indexed"
    pattern: re.Pattern | None = None
    index: ast.Index | None = None


@dataclass
class MatchResult:
    """What one selector matched: paths (natural order) with the prefix each match starts under."""

    paths: list[str] = field(default_factory=list)
    prefixes: dict[str, str] = field(default_factory=dict)
    out_of_range: list[tuple[int, str, int]] = field(default_factory=list)  # (position, list path, length)


def _piece_regex(piece) -> str:
    if isinstance(piece, ast.Literal):
        return re.escape(piece.text)
    if isinstance(piece, ast.Star):
        return "[^.]*"
    options = ("".join(_piece_regex(p) for p in option) for option in piece.options)
    return "(?:" + "|".join(options) + ")"


def segment_regex(segment: ast.NameSegment) -> re.Pattern:
    return _compiled("".join(_piece_regex(p) for p in segment.pieces))


@lru_cache(maxsize=4096)
def _compiled(source: str) -> re.Pattern:
    return re.compile(source)


def compile_steps(selector: ast.Selector) -> tuple[Step, ...]:
    steps = []
    for segment in selector.segments:
        if isinstance(segment, ast.DeepSegment):
            steps.append(Step("deep"))
        elif segment.index is None:
            steps.append(Step("name", segment_regex(segment)))
        else:
            steps.append(Step("indexed", segment_regex(segment), segment.index))
    return tuple(steps)


def resolve_index(index: ast.Index, length: int) -> tuple[set[int], list[int]]:
    """The list positions an index selects, and the literal positions that lie outside the list."""
    if isinstance(index, ast.IndexAll):
        return set(range(length)), []
    if isinstance(index, ast.IndexSlice):
        return set(range(length)[slice(index.start, index.stop, index.step)]), []
    chosen, outside = set(), []
    for value in index.values:
        position = value + length if value < 0 else value
        if 0 <= position < length:
            chosen.add(position)
        else:
            outside.append(value)
    return chosen, outside


# An automaton state: (steps consumed, awaiting a list position?, depth where the match began).
State = tuple[int, bool, int]


class SelectorMatcher:
    """Matches one selector against every module path of a ModuleIndex."""

    def __init__(self, selector: ast.Selector):
        self.selector = selector
        self.steps = compile_steps(selector)
        self.anchored = selector.anchored

    def _closure(self, states: set[State]) -> set[State]:
        out = set(states)
        stack = list(states)
        while stack:
            k, awaiting, start = stack.pop()
            if not awaiting and k < len(self.steps) and self.steps[k].kind == "deep":
                nxt = (k + 1, False, start)
                if nxt not in out:
                    out.add(nxt)
                    stack.append(nxt)
        return out

    def _advance(self, states: set[State], name: str, is_list: bool, parent_path: str, index_cache) -> set[State]:
        out: set[State] = set()
        for k, awaiting, start in states:
            if awaiting:
                step = self.steps[k]
                if not name.isdigit():
                    continue
                key = (k, parent_path)
                if key not in index_cache:
                    length = index_cache["__lengths__"](parent_path)
                    chosen, outside = resolve_index(step.index, length)
                    index_cache[key] = chosen
                    index_cache["__outside__"].extend((k, value, parent_path, length) for value in outside)
                    if isinstance(step.index, ast.IndexList):
                        index_cache["__inside__"].update((k, v) for v in step.index.values if v not in outside)
                if int(name) in index_cache[key]:
                    out.add((k + 1, False, start))
                continue
            if k >= len(self.steps):
                continue
            step = self.steps[k]
            if step.kind == "deep":
                out.add((k, False, start))
            elif step.pattern.fullmatch(name):
                if step.kind == "name":
                    out.add((k + 1, False, start))
                elif is_list:
                    out.add((k, True, start))
        return self._closure(out)

    def match(self, index) -> MatchResult:
        """Every module path the selector matches, each with the path prefix its match starts under."""
        result = MatchResult()
        cache = {"__lengths__": index.list_length, "__outside__": [], "__inside__": set()}
        final = len(self.steps)
        tree = _tree(index)
        # The automaton's move depends on the incoming states, the depth, the child's name and whether it
        # is a list (and, while a list position is awaited, on which list): blocks repeat, so moves do too.
        moves: dict[tuple, tuple[frozenset, int | None, bool]] = {}

        def move(states: frozenset, depth: int, name: str, is_list: bool, parent_path: str, alias: str | None):
            incoming = states if self.anchored or depth == 0 else states | self._closure({(0, False, depth)})
            reached = self._advance(incoming, name, is_list, parent_path, cache)
            if alias is not None:  # the block list answers to `layers` too, whatever its own name
                reached |= self._advance(incoming, alias, is_list, parent_path, cache)
            reached = frozenset(reached)
            starts = [s[2] for s in reached if s[0] == final and not s[1]]
            return reached, (min(starts) if starts else None), any(s[1] for s in reached)

        def walk(parent_path: str, depth: int, states: frozenset, awaiting: bool) -> None:
            for path, name, is_list, alias in tree.get(parent_path, ()):
                key = (states, depth, name, is_list, parent_path if awaiting else None, alias)
                found = moves.get(key)
                if found is None:
                    found = moves[key] = move(states, depth, name, is_list, parent_path, alias)
                reached, start, reached_awaiting = found
                if start is not None:
                    result.paths.append(path)
                    result.prefixes[path] = ".".join(path.split(".")[:start])
                if reached or not self.anchored:
                    walk(path, depth + 1, reached, reached_awaiting)

        walk("", 0, frozenset(self._closure({(0, False, 0)})), False)
        # a position is out of range when it lies outside every list it was applied to
        for k, value, list_path, length in cache["__outside__"]:
            if (k, value) not in cache["__inside__"] and (value, list_path, length) not in result.out_of_range:
                result.out_of_range.append((value, list_path, length))
        return result


_TREES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _tree(index) -> dict[str, list[tuple[str, str, bool, str | None]]]:
    """Parent path → its children as (path, name, is list, other name), in natural order; built once per index.

    The other name is `layers` for the model's block lists when they have another name (`h`, `blocks`)."""
    tree = _TREES.get(index)
    if tree is None:
        tree = {}
        blocks = block_lists(index)
        for info in index:
            if info.path and info.parent != info.path:  # an odd path can never be its own child: no endless walk
                alias = BLOCKS_ALIAS if info.path in blocks and info.name != BLOCKS_ALIAS else None
                tree.setdefault(info.parent, []).append((info.path, info.name, info.family == "list", alias))
        _TREES[index] = tree
    return tree


def literal_names(selector: ast.Selector) -> list[str]:
    """The plain names a selector spells (for did-you-mean suggestions)."""
    names = []
    for segment in selector.segments:
        if isinstance(segment, ast.NameSegment):
            for piece in segment.pieces:
                if isinstance(piece, ast.Literal):
                    names.append(piece.text)
                elif isinstance(piece, ast.Alternation):
                    for option in piece.options:
                        names.extend(p.text for p in option if isinstance(p, ast.Literal))
    return names
