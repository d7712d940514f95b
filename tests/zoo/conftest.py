"""The zoo's marker: `zoo` marks every architecture; only the fast subset runs unless asked.

`pytest tests/zoo` runs the fast subset (about 8 architectures); `pytest tests/zoo -m zoo` or
`ADAPTERSPEC_ZOO=1 pytest tests/zoo` runs every architecture of the installed mlx-lm.
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "zoo: a conformance check on one mlx-lm architecture (the full zoo: -m zoo or ADAPTERSPEC_ZOO=1)"
    )
    config.addinivalue_line("markers", "zoo_fast: an architecture of the zoo's fast subset, run by default")


def _full_zoo(config) -> bool:
    return os.environ.get("ADAPTERSPEC_ZOO", "") not in ("", "0") or "zoo" in (config.option.markexpr or "")


def pytest_collection_modifyitems(config, items):
    if _full_zoo(config):
        return
    skip = pytest.mark.skip(reason="not in the zoo's fast subset: run with -m zoo or ADAPTERSPEC_ZOO=1")
    for item in items:
        if item.get_closest_marker("zoo") and not item.get_closest_marker("zoo_fast"):
            item.add_marker(skip)
