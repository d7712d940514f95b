"""Write spec text: transform calls, index sets, and explicit rules for a module → transform assignment."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Optional

from ..errors import UserError
from ..model.index import ModuleIndex, natural_key
from ..model.mlxlm import block_list_path

BUILTIN_QUIET = {"rslora": False, "dropout": 0.0}


@dataclass(frozen=True)
class Assignment:
    """What one module gets: a transform kind and its arguments in spec order (r, alpha, rslora, scale, dropout)."""

    kind: str
    r: Optional[int] = None
    alpha: Optional[float] = None
    rslora: bool = False
    scale: Optional[float] = None
    dropout: float = 0.0

    def arguments(self) -> dict:
        if self.kind in ("full", "none"):
            return {}
        out: dict = {"r": self.r}
        if self.alpha is not None:
            out["alpha"] = self.alpha
            out["rslora"] = self.rslora
        else:
            out["scale"] = self.scale
        out["dropout"] = self.dropout
        return out


def number(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def call(kind: str, arguments: dict, defaults: Optional[dict] = None) -> str:
    """`kind(name=value, …)` with the arguments that differ from `defaults` (bare `kind` when none do)."""
    defaults = defaults or {}
    inherited = {**BUILTIN_QUIET, **defaults}
    shown = {k: v for k, v in arguments.items() if inherited.get(k) != v}
    if "alpha" in arguments and "alpha" not in shown and "scale" in defaults:
        shown["alpha"] = arguments["alpha"]
    if "scale" in arguments and "scale" not in shown and "alpha" in defaults:
        shown["scale"] = arguments["scale"]
    if not shown:
        return kind
    return f"{kind}(" + ", ".join(f"{k}={number(v)}" for k, v in shown.items()) + ")"


def index_set(positions: list[int], length: int) -> str:
    """The shortest selector index for a set of list positions: [*], [-k:], [a:b] or [i,j,…]."""
    chosen = sorted(set(positions))
    if chosen == list(range(length)):
        return "[*]"
    contiguous = chosen == list(range(chosen[0], chosen[-1] + 1))
    if contiguous and len(chosen) > 1 and chosen[-1] == length - 1:
        return f"[-{len(chosen)}:]"
    if contiguous and len(chosen) > 2:
        return f"[{chosen[0]}:{chosen[-1] + 1}]"
    return "[" + ",".join(str(p) for p in chosen) + "]"


def alternation(names: list[str]) -> str:
    return names[0] if len(names) == 1 else "<" + ",".join(names) + ">"


def _group_leaves(paths: list[str]) -> list[str]:
    """Dotted relative paths, with siblings folded into one alternation (`self_attn.<q_proj,v_proj>`)."""
    by_parent: dict[str, list[str]] = defaultdict(list)
    for path in sorted(paths, key=natural_key):
        parent, _, leaf = path.rpartition(".")
        by_parent[parent].append(leaf)
    return [
        f"{parent}.{alternation(leaves)}" if parent else alternation(leaves) for parent, leaves in by_parent.items()
    ]


def selectors_for(paths: list[str], index: ModuleIndex) -> list[str]:
    """Anchored selectors that match exactly `paths` (blocks folded into index sets)."""
    blocks = block_list_path(index)
    prefix = blocks + "." if blocks else None
    in_blocks: dict[str, list[int]] = defaultdict(list)
    outside = []
    for path in paths:
        if prefix and path.startswith(prefix):
            number_text, _, rel = path[len(prefix) :].partition(".")
            in_blocks[rel].append(int(number_text))
        else:
            outside.append(path)
    by_positions: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for rel, positions in in_blocks.items():
        by_positions[tuple(sorted(set(positions)))].append(rel)
    out = []
    length = index.list_length(blocks) if blocks else 0
    for positions, rels in sorted(by_positions.items()):
        whole = f"/{_indexed(blocks)}{index_set(list(positions), length)}"
        out += [whole] if "" in rels else []
        out += [f"{whole}.{rel}" for rel in _group_leaves([r for r in rels if r])]
    for path in _group_leaves(outside):
        out.append("/" + _indexed(path))
    return out


def _indexed(path: str) -> str:
    """`model.layers.0.mlp` → `model.layers[0].mlp` (list positions written as indices)."""
    parts: list[str] = []
    for part in path.split("."):
        if part.isdigit() and parts and not parts[-1].endswith("]"):
            parts[-1] += f"[{part}]"
        else:
            parts.append(part)
    return ".".join(parts)


def explicit_rules(assignments: dict[str, Assignment], index: ModuleIndex) -> tuple[list[str], list[str]]:
    """(defaults lines, rule lines) giving every module of `assignments` exactly its assignment, nothing else."""
    by_assignment: dict[Assignment, list[str]] = defaultdict(list)
    for path, assignment in assignments.items():
        by_assignment[assignment].append(path)
    defaults_lines, defaults = [], {}
    for kind in ("lora", "dora"):
        counts = Counter(a for a in assignments.values() if a.kind == kind)
        if counts:
            common = counts.most_common(1)[0][0].arguments()
            defaults[kind] = common
            defaults_lines.append(f"defaults {call(kind, common)}")
    rules = []
    ordered = sorted(by_assignment.items(), key=lambda item: (item[0].kind == "full", -len(item[1])))
    for assignment, paths in ordered:
        text = call(assignment.kind, assignment.arguments(), defaults.get(assignment.kind))
        rules += [f"{selector}: {text}" for selector in selectors_for(paths, index)]
    return defaults_lines, rules


def require_lint_clean(text: str, source: str) -> str:
    """The imported spec text, refused unless `adapterspec lint` passes it (no errors): nothing an import writes
    may fail the project's own checks."""
    from ..language.lint import lint_text

    errors = [d for d in lint_text(text, "<imported spec>") if d.is_error]
    if errors:
        first = errors[0]
        line = f" line {first.span.line}:" if first.span else ""
        raise UserError(
            f"{source}: the imported spec would not pass lint ({len(errors)} error(s);{line} {first.code} {first.message})",
            help="the config holds values a spec cannot say; fix them, or report this with the config",
        )
    return text
