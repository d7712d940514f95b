"""Helper processes that run this same package: `python -m adapterspec.…` with it on PYTHONPATH, installed or not."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def python_module(module: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """The command running `module` with this interpreter, and this process's environment with the directory that
    holds the `adapterspec` package first on PYTHONPATH."""
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    return [sys.executable, "-m", module, *args], env
