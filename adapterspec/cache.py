"""Where adapterspec keeps files between runs: $XDG_CACHE_HOME/adapterspec, else ~/.cache/adapterspec."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def cache_dir() -> Optional[Path]:
    """The cache directory, created if need be; None where there is none to use (a relative base, no permission)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not os.path.isabs(base):
        return None
    directory = Path(base) / "adapterspec"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return directory
