"""The lint path never imports mlx (pre-commit stays fast and needs no MLX install); checked in fresh processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SPEC = str(ROOT / "examples" / "specs" / "moe.aspec")
MODEL = str(ROOT / "examples" / "models" / "tiny-moe")

# Runs the given code with any import of mlx / mlx_lm refused, then reports what got imported.
PROBE = """
import importlib.abc, json, sys
attempts = []
class RefuseMlx(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mlx", "mlx_lm"):
            attempts.append(name)
            raise ImportError(f"{name} must not be imported here")
        return None
sys.meta_path.insert(0, RefuseMlx())
result = None
try:
    exec(sys.argv[1])
finally:
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("mlx", "mlx_lm", "pydantic"))
    print(json.dumps({"attempts": attempts, "loaded": loaded, "result": result}))
"""


def probe(code: str) -> dict:
    completed = subprocess.run([sys.executable, "-c", PROBE, code], capture_output=True, text=True, cwd=ROOT,
                               timeout=120)  # fmt: skip
    assert completed.stdout, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["attempts"] == [], report
    assert not [m for m in report["loaded"] if not m.startswith("pydantic")], report
    return report


def test_import_adapterspec():
    probe("import adapterspec")


@pytest.mark.parametrize("argv", [
    ["lint", SPEC],
    ["lint", "--format", "json", "--strict", SPEC],
    ["lint", SPEC, "--model", MODEL],
    ["fmt", "--check", SPEC],
])  # fmt: skip
def test_commands_never_import_mlx(argv):
    report = probe(f"from adapterspec.cli import main\nresult = main({argv!r})")
    assert report["result"] == 0


def test_python_api_never_imports_mlx():
    report = probe("import adapterspec\nspec = adapterspec.load_spec(" + repr(SPEC) + ")\n"
                   "result = len(adapterspec.lint_text('q: lora'))")  # fmt: skip
    assert report["result"] == 0


def test_plain_lint_does_not_even_load_pydantic_models():
    # Part of the speed budget of `adapterspec lint` (benchmarks/lint.py): validation for lint is plain Python.
    report = probe(f"from adapterspec.cli import main\nresult = main({['lint', SPEC]!r})")
    assert "pydantic.main" not in report["loaded"]


MLX_FREE_PACKAGES = ("adapterspec.language", "adapterspec.model")
# The lint path: what `adapterspec lint` (without --model) and `fmt` load; pydantic stays out of it.
LINT_PATH = (
    "adapterspec.language.lint",
    "adapterspec.language.format",
    "adapterspec.language.codes",
    "adapterspec.commands.lint",
    "adapterspec.commands.fmt",
)


def modules_of(package: str) -> list[str]:
    folder = ROOT / package.replace(".", "/")
    return [f"{package}.{p.stem}" for p in sorted(folder.glob("*.py")) if p.stem != "__init__"]


@pytest.mark.parametrize("package", MLX_FREE_PACKAGES)
def test_every_module_of_an_mlx_free_package_imports_without_mlx(package):
    names = modules_of(package)
    assert len(names) >= 5
    probe("import importlib\nfor name in " + repr(names) + ":\n    importlib.import_module(name)")


def test_the_lint_path_imports_neither_mlx_nor_pydantic():
    report = probe("import importlib\nfor name in " + repr(list(LINT_PATH)) + ":\n    importlib.import_module(name)")
    assert [m for m in report["loaded"] if m.split(".")[0] == "pydantic"] == []


@pytest.mark.parametrize("argv", [["tree", MODEL], ["plan", MODEL, SPEC], ["explain", SPEC, MODEL]])
def test_model_directory_commands_never_import_mlx(argv):
    report = probe(f"from adapterspec.cli import main\nresult = main({argv!r})")
    assert report["result"] == 0
