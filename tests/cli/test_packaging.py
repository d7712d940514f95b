"""The wheel: built from this tree, installed into a fresh virtual environment outside it with only its
declared dependencies (lark, pydantic), and its `adapterspec` program lints a spec with the packaged grammar.

Needs the package index that pip is configured with (for hatchling, lark and pydantic); takes ~30 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What the sdist holds (pyproject.toml's [tool.hatch.build.targets.sdist]), so the build sees no stray files.
SOURCE_ITEMS = ("pyproject.toml", "README.md", "adapterspec", "grammar")
CORE_DISTRIBUTIONS = {"adapterspec", "lark", "pydantic", "pydantic-core", "annotated-types", "typing-extensions",
                      "typing-inspection", "pip", "setuptools"}  # fmt: skip


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, (
        f"{' '.join(map(str, command))}\n{completed.stdout[-2000:]}\n{completed.stderr[-3000:]}"
    )
    return completed


def source_copy(destination: Path) -> Path:
    destination.mkdir(parents=True)
    for item in SOURCE_ITEMS:
        source = ROOT / item
        if source.is_dir():
            shutil.copytree(source, destination / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, destination / item)
    return destination


def clean_environment(base: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["XDG_CACHE_HOME"] = str(base / "cache")
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    source = source_copy(base / "source")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(base), str(source)]
    run(command, base, clean_environment(base))
    (built,) = base.glob("adapterspec-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    """(the venv's bin directory, an environment without this tree on the path, a working directory)."""
    base = tmp_path_factory.mktemp("venv")
    env = clean_environment(base)
    venv = base / "venv"
    run([sys.executable, "-m", "venv", str(venv)], base, env)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet", str(wheel)], base, env)
    work = base / "work"
    work.mkdir()
    return bin_dir, env, work


def test_wheel_contains_the_grammar_and_no_tests(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "adapterspec/_grammar/adapterspec.lark" in names
    assert "adapterspec/commands/lint.py" in names and "adapterspec/commands/fmt.py" in names
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]


def test_installed_program_lints_with_only_the_core_dependencies(installed):
    bin_dir, env, work = installed
    program = str(bin_dir / "adapterspec")
    (work / "good.aspec").write_text("adapterspec 1\nlayers[*].self_attn.<q,v>_proj: lora(r=8)\n")
    (work / "bad.aspec").write_text("layers[*].self_attn.q_proj: lora(rank=8)\n")

    good = subprocess.run([program, "lint", "good.aspec"], cwd=work, env=env, capture_output=True, text=True)
    assert (good.returncode, good.stdout, good.stderr) == (0, "", "")
    bad = subprocess.run([program, "lint", "bad.aspec"], cwd=work, env=env, capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stdout.startswith("bad.aspec:1:34: AS201 unknown argument 'rank' for lora (did you mean 'r'?)\n")

    listed = run([str(bin_dir / "python"), "-m", "pip", "list", "--format=freeze"], work, env).stdout
    distributions = {line.split("==")[0].lower().replace("_", "-") for line in listed.splitlines() if line}
    assert distributions <= CORE_DISTRIBUTIONS, distributions - CORE_DISTRIBUTIONS


def test_installed_package_reads_its_packaged_grammar(installed):
    bin_dir, env, work = installed
    code = ("import adapterspec, adapterspec.language.parse as p, pathlib\n"
            "packaged = pathlib.Path(p.__file__).parents[1] / '_grammar' / 'adapterspec.lark'\n"
            "assert packaged.is_file(), packaged\n"
            "assert not (pathlib.Path(p.__file__).parents[2] / 'grammar').exists()\n"
            "assert p.grammar_text() == packaged.read_text(encoding='utf-8')\n"
            "print(adapterspec.parse_spec('q: lora').rules[0].transform.describe())")  # fmt: skip
    assert run([str(bin_dir / "python"), "-c", code], work, env).stdout.strip() == "lora(r=8, scale=20)"


def test_installed_fmt_and_version(installed):
    bin_dir, env, work = installed
    (work / "messy.aspec").write_text("q_proj :lora( r = 8 )   # why\n")
    run([str(bin_dir / "adapterspec"), "fmt", "messy.aspec"], work, env)
    assert (work / "messy.aspec").read_text() == "q_proj: lora(r=8)  # why\n"
    assert run([str(bin_dir / "adapterspec"), "--version"], work, env).stdout.startswith("adapterspec ")
