"""`adapterspec tree MODEL [SELECTOR]`: the module tree with classes and shapes, repeated blocks folded,
and the modules a selector matches marked."""

from __future__ import annotations

import argparse

from ..errors import EXIT_ERRORS, EXIT_OK
from ..model.blocks import BLOCKS_ALIAS, block_lists
from ..model.roles import module_roles
from .common import describe_shape, model_index, print_diagnostics

MARK = "●"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a local mlx-lm model directory (or a repo id in the local cache)")
    parser.add_argument("selector", nargs="?", help="mark what this selector matches, e.g. 'layers[*].mlp.*'")
    parser.add_argument("--no-fold", action="store_true", help="list every block instead of folding repeats")


def compile_selector(text: str):
    """A selector given on the command line, parsed by the spec grammar (as the rule 'SELECTOR: none')."""
    from ..language.lint import check_text

    spec, diagnostics = check_text(f"{text}: none\n", "<selector>")
    errors = [d for d in diagnostics if d.is_error]
    if errors or spec is None:
        return None, errors, f"{text}: none\n"
    return spec.rules[0], [], None


def shown_roles(index) -> dict[str, tuple[str, ...]]:
    """Path → the role filters to print beside it: each role once, on the highest module whose adaptable
    modules all have it (`self_attn  @attention`, `switch_mlp  @experts`, `lm_head  @head`)."""
    common: dict[str, frozenset[str]] = {}
    for info in reversed(index.modules.values()):  # children before their parents
        roles = frozenset(module_roles(index, info.path)) if info.adaptable else None
        for child in index.children(info.path):
            if child.path in common:
                roles = common[child.path] if roles is None else roles & common[child.path]
        if roles is not None:
            common[info.path] = roles
    return {
        path: tuple(sorted(roles - common.get(index[path].parent, frozenset())))
        for path, roles in common.items()
        if roles - common.get(index[path].parent, frozenset())
    }


class TreePrinter:
    def __init__(self, index, marked: set[str], fold: bool):
        self.index = index
        self.marked = marked
        self.fold = fold
        self.roles = shown_roles(index)
        self.lines: list[str] = []

    def signature(self, path: str) -> tuple:
        start = len(path) + 1
        return tuple(
            (m.path[start:], m.cls, describe_shape(m), m.path in self.marked)
            for m in [self.index[path]] + self.index.descendants(path)
        )

    def groups(self, parent: str):
        children = self.index.children(parent)
        is_list = bool(parent) and self.index[parent].family == "list"
        if not (self.fold and is_list):
            return [[c] for c in children]
        groups: list[list] = []
        previous = None
        for child in children:
            signature = self.signature(child.path)
            if groups and signature == previous:
                groups[-1].append(child)
            else:
                groups.append([child])
            previous = signature
        return groups

    def label(self, group) -> str:
        first = group[0]
        if len(group) == 1:
            return first.name
        return f"{first.parent.rsplit('.', 1)[-1]}[{first.name}..{group[-1].name}] ×{len(group)}"

    def walk(self, parent: str, prefix: str) -> None:
        groups = self.groups(parent)
        for position, group in enumerate(groups):
            last = position == len(groups) - 1
            info = group[0]
            mark = f"{MARK} " if info.path in self.marked else ""
            name = self.label(group) if len(group) > 1 else info.name
            details = " ".join(
                x
                for x in (
                    info.cls if info.family != "list" else f"list[{self.index.list_length(info.path)}]",
                    describe_shape(info),
                )
                if x
            )
            if info.path in self.roles:  # what the role type filters select, e.g. `**@attention`
                details += "  " + " ".join(f"@{r}" for r in self.roles[info.path])
            if info.path in block_lists(self.index) and info.name != BLOCKS_ALIAS:
                details += f"  ({BLOCKS_ALIAS})"  # what the selector segment `layers` means in this model
            self.lines.append(f"{prefix}{'└── ' if last else '├── '}{mark}{name}  {details}")
            self.walk(info.path, prefix + ("    " if last else "│   "))


def run(args) -> int:
    from ..model.explain import marked_paths

    index = model_index(args.model)
    marked: set[str] = set()
    rule = None
    if args.selector:
        rule, errors, source = compile_selector(args.selector)
        if rule is None:
            print_diagnostics(errors, source, "<selector>")
            return EXIT_ERRORS
        marked = marked_paths(rule, index)
    printer = TreePrinter(index, marked, fold=not args.no_fold)
    printer.walk("", "")
    header = f"{args.model}  ({index.model_type or 'unknown model type'}, {index.total_params:,} parameters"
    header += ", tied embeddings)" if index.tied_embeddings else ")"
    print(header)
    print("\n".join(printer.lines))
    if rule is not None:
        count = len(marked)
        print(f"\n{MARK} '{args.selector}' matches {count} module{'s' if count != 1 else ''}")
        if not count:
            return EXIT_ERRORS
    return EXIT_OK
