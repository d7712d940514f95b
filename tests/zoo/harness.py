"""Every use of adapterspec in the zoo suite goes through this module.

The package is being restructured: when a name moves, fix its import here and nowhere else.
Only public names are used, plus the command line (`python -m adapterspec fuse`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from adapterspec import ModuleIndex, apply, load_adapters, make_plan, parse_spec, save_adapters
from adapterspec.model.families import UNADAPTABLE_CLASSES, UNFUSABLE_MODULES
from adapterspec.model.roles import roles

__all__ = [
    "ModuleIndex",
    "apply",
    "documented_refusal",
    "fuse_cli",
    "load_adapters",
    "make_plan",
    "parse_spec",
    "roles",
    "save_adapters",
]

ROOT = Path(__file__).resolve().parent.parent.parent


def fuse_cli(model_dir, adapter_dir, out_dir, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m adapterspec fuse MODEL ADAPTERS -o OUT --quiet`, on this checkout's package."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    argv = [
        sys.executable,
        "-m",
        "adapterspec",
        "fuse",
        str(model_dir),
        str(adapter_dir),
        "-o",
        str(out_dir),
        "--quiet",
        *extra,
    ]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)


def documented_refusal(message: str) -> str | None:
    """The rule that leaves out what adapterspec refused, when `message` gives one of the documented reasons
    (docs/architecture.md, "Architectures with limits"); None for any other failure."""
    text = " ".join(message.split())
    for cls, reason in UNADAPTABLE_CLASSES.items():
        if reason[:60] in text:
            return f"**@{cls}: none"
    for (_, path), reason in UNFUSABLE_MODULES.items():
        if reason[:60] in text:
            return f"/{path}: none"
    return None
