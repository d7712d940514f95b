"""This repository's .pre-commit-hooks.yaml, run by the real `pre-commit` in a throwaway git repository:
a bad spec blocks the commit with its diagnostic, an unformatted one is rewritten, a good one passes.

pre-commit installs the hooks' repository with pip (hatchling, lark, pydantic from the package index); ~30-60 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The files pip needs to install this project, plus the hooks file itself.
HOOK_REPOSITORY_ITEMS = ("pyproject.toml", "README.md", "adapterspec", "grammar", ".pre-commit-hooks.yaml")

GOOD = "adapterspec 1\n\nlayers[*].self_attn.<q,v>_proj: lora(r=8)  # attention\n"
UNFORMATTED = "adapterspec 1\n\n\n\nlayers[*].self_attn.<q,v>_proj :lora( r = 8 )   # attention\n"
BAD = "layers[*].self_attn.q_proj: lora(rank=8)\n"


def git(cwd: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def checked(completed: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert completed.returncode == 0, f"{completed.args}\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    return completed


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A git repository whose .pre-commit-config.yaml uses a snapshot of this tree as its hooks repository."""
    if shutil.which("git") is None:
        pytest.fail("git is needed to test the pre-commit hooks")
    base = tmp_path_factory.mktemp("precommit")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "PRE_COMMIT")) and k != "PYTHONPATH"}
    env.update(
        PRE_COMMIT_HOME=str(base / "pre-commit-home"), XDG_CACHE_HOME=str(base / "cache"), HOME=str(base / "home"),
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.invalid",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.invalid", GIT_CONFIG_NOSYSTEM="1",
    )  # fmt: skip
    (base / "home").mkdir()

    hooks = base / "hooks"
    hooks.mkdir()
    for item in HOOK_REPOSITORY_ITEMS:
        source = ROOT / item
        if source.is_dir():
            shutil.copytree(source, hooks / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, hooks / item)
    checked(git(hooks, "init", "--quiet", "--initial-branch=main", env=env))
    checked(git(hooks, "add", "--all", env=env))
    checked(git(hooks, "-c", "commit.gpgsign=false", "commit", "--quiet", "-m", "snapshot", env=env))
    revision = checked(git(hooks, "rev-parse", "HEAD", env=env)).stdout.strip()

    work = base / "project"
    work.mkdir()
    checked(git(work, "init", "--quiet", "--initial-branch=main", env=env))
    checked(git(work, "config", "commit.gpgsign", "false", env=env))
    (work / ".pre-commit-config.yaml").write_text(
        "repos:\n"
        f"  - repo: {hooks.as_posix()}\n"
        f"    rev: {revision}\n"
        "    hooks:\n"
        "      - id: adapterspec-lint\n"
        "      - id: adapterspec-fmt\n"
    )
    pre_commit = [sys.executable, "-m", "pre_commit"]
    checked(subprocess.run(pre_commit + ["install"], cwd=work, env=env, capture_output=True, text=True))
    checked(subprocess.run(pre_commit + ["install-hooks"], cwd=work, env=env, capture_output=True, text=True,
                           timeout=600))  # fmt: skip
    checked(git(work, "add", ".pre-commit-config.yaml", env=env))
    checked(git(work, "commit", "--quiet", "-m", "config", env=env))
    return work, env


def commit(work: Path, env: dict[str, str], name: str, content: str) -> subprocess.CompletedProcess:
    (work / name).write_text(content)
    checked(git(work, "add", name, env=env))
    return git(work, "commit", "-m", f"add {name}", env=env)


def test_bad_spec_blocks_the_commit_with_its_diagnostic(project):
    work, env = project
    result = commit(work, env, "bad.aspec", BAD)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "adapterspec lint" in output and "Failed" in output
    assert "bad.aspec:1:34: AS201 unknown argument 'rank' for lora (did you mean 'r'?)" in output
    checked(git(work, "reset", "--quiet", "HEAD", "bad.aspec", env=env))
    (work / "bad.aspec").unlink()


def test_unformatted_spec_is_rewritten_and_then_passes(project):
    work, env = project
    first = commit(work, env, "messy.aspec", UNFORMATTED)
    output = first.stdout + first.stderr
    assert first.returncode != 0
    assert "adapterspec fmt" in output and "files were modified by this hook" in output
    assert (work / "messy.aspec").read_text() == GOOD
    checked(git(work, "add", "messy.aspec", env=env))
    checked(git(work, "commit", "--quiet", "-m", "formatted", env=env))


def test_good_spec_passes(project):
    work, env = project
    result = commit(work, env, "good.aspec", GOOD)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "adapterspec lint" in output and "Passed" in output
    assert checked(git(work, "log", "--oneline", "-1", env=env)).stdout.strip().endswith("add good.aspec")
