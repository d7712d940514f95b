"""The package's layout as docs/architecture.md draws it: stages import only downwards, no circle, at most 8 levels
of stages from the command line down and short chains inside each stage, no command imports another, and no
public name of `adapterspec` is also a submodule's. Every import counts, lazy ones inside functions too; only
those under `if TYPE_CHECKING:` (never executed) do not."""

from __future__ import annotations

import ast
import functools
import pkgutil
from pathlib import Path

import adapterspec

PACKAGE = Path(adapterspec.__file__).parent
# The stages from the bottom up; a module may import its own stage and those below it, never one above.
BASE = ("errors", "cache", "outputs", "tables", "inputs", "jsonfile", "processes", "process_end")
STAGES = {
    "base": 0,
    "language": 1,
    "model": 2,
    "adapters": 3,
    "fuse": 4,
    "train": 4,
    "interop": 4,
    "commands": 5,
    "cli": 6,
}
SIBLINGS_APART = {"fuse", "train", "interop"}
MAX_DEPTH = 8
# The longest chain of modules importing each other inside one stage.
MAX_DEPTH_IN_STAGE = 5


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()


def resolve(importer: str, node: ast.ImportFrom) -> list[str]:
    """The adapterspec modules an import statement (at any depth, lazy ones too) loads."""
    package = importer if is_package(importer) else importer.rpartition(".")[0]
    if node.level:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("adapterspec"):
        return []
    submodules = [f"{target}.{a.name}" for a in node.names if is_module(f"{target}.{a.name}")]
    # `from . import fusemath` loads that module; its package is loaded already (by Python, not by this import).
    return submodules if len(submodules) == len(node.names) else [target] + submodules


def is_module(name: str) -> bool:
    return (PACKAGE.parent / (name.replace(".", "/") + ".py")).is_file() or is_package(name)


@functools.lru_cache(maxsize=None)
def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        targets = edges.setdefault(name, set())
        for node in runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                targets.update(resolve(name, node))
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("adapterspec"))
        targets.discard(name)
        targets.discard("adapterspec")  # the package's face (its version, its lazy public names)
    return edges


def runtime_nodes(tree: ast.AST):
    """Every node of the tree but those under `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        yield node
        yield from runtime_nodes(node)


def longest_chain(edges: dict[str, set[str]], start: str) -> int:
    @functools.lru_cache(maxsize=None)
    def depth(node: str) -> int:
        return 1 + max((depth(t) for t in edges.get(node, ())), default=0)

    return depth(start)


def stage(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in BASE:
        return "base"
    if parts[1] == "__main__":
        return "cli"
    return parts[1]


def test_the_graph_sees_the_stages():
    edges = graph()
    assert "adapterspec.cli" in edges and "adapterspec.language.lint" in edges["adapterspec.commands.common"] | {
        t for m in edges if m.startswith("adapterspec.commands") for t in edges[m]
    }
    assert {stage(m) for m in edges} == set(STAGES)


def test_imports_run_down_the_stages_only():
    upward = [(m, t) for m, targets in graph().items() for t in targets if STAGES[stage(t)] > STAGES[stage(m)]]
    assert upward == []


def test_fuse_train_and_interop_do_not_import_each_other():
    across = [
        (m, t)
        for m, targets in graph().items()
        for t in targets
        if stage(m) in SIBLINGS_APART and stage(t) in SIBLINGS_APART and stage(m) != stage(t)
    ]
    assert across == []


def test_no_command_imports_another():
    commands = {m for m in graph() if m.startswith("adapterspec.commands.")}
    shared = {"adapterspec.commands.common", "adapterspec.commands.reports"}
    crossing = [(m, t) for m in commands - shared for t in graph()[m] if t in commands - shared]
    assert crossing == []


def test_no_circle():
    edges, state, stack, circles = graph(), {}, [], []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                circles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert circles == []


def test_at_most_eight_levels_of_stages_below_the_command_line():
    stages: dict[str, set[str]] = {}
    for module, targets in graph().items():
        stages.setdefault(stage(module), set()).update(stage(t) for t in targets if stage(t) != stage(module))
    stages["cli"].add("commands")  # cli.py imports the chosen command by name (importlib)
    assert longest_chain(stages, "cli") <= MAX_DEPTH


def test_chains_inside_a_stage_are_short():
    edges = graph()
    inside = {m: {t for t in targets if stage(t) == stage(m)} for m, targets in edges.items()}
    longest = {m: longest_chain(inside, m) for m in inside}
    assert max(longest.values()) <= MAX_DEPTH_IN_STAGE, sorted(longest.items(), key=lambda item: -item[1])[:5]


def test_no_public_name_is_also_a_submodule():
    submodules = {info.name for info in pkgutil.iter_modules([str(PACKAGE)])}
    assert set(adapterspec.__all__) & submodules == set()


def test_public_functions_stay_callable_after_every_submodule_is_imported():
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, adapterspec\n"
        "adapterspec.load_adapters\n"
        "for info in pkgutil.walk_packages(adapterspec.__path__, 'adapterspec.'):\n"
        "    if not info.name.endswith('__main__'):\n"
        "        importlib.import_module(info.name)\n"
        "print(sorted(n for n in adapterspec.__all__ if not (callable(getattr(adapterspec, n)) or isinstance(getattr(adapterspec, n), type))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
