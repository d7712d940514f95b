"""Golden files: each tests/golden/NAME.aspec and the exact text `adapterspec lint` prints for it (NAME.txt).

Rewrite the expected outputs with `pytest tests/language/test_golden.py --update-golden` (or ADAPTERSPEC_UPDATE_GOLDEN=1),
then read the diff before committing it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from adapterspec.cli import main

GOLDEN = Path(__file__).resolve().parent / "golden"
CASES = sorted(GOLDEN.glob("*.aspec"))
CODES = (
    ["AS100", "AS101", "AS102", "AS103", "AS104", "AS105", "AS106", "AS107"]
    + [f"AS2{n:02d}" for n in range(1, 15)]
    + ["AS401", "AS402", "AS403", "AS404"]
)


@pytest.fixture
def update(request) -> bool:
    return request.config.getoption("--update-golden") or os.environ.get("ADAPTERSPEC_UPDATE_GOLDEN") == "1"


def lint_output(case: Path, capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.chdir(GOLDEN.parent)
    code = main(["lint", f"golden/{case.name}"])
    captured = capsys.readouterr()
    assert captured.err == ""
    return code, captured.out


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_golden_output(case, capsys, monkeypatch, update):
    code, out = lint_output(case, capsys, monkeypatch)
    expected_file = case.with_suffix(".txt")
    if update:
        expected_file.write_text(out, encoding="utf-8", newline="\n")
    assert expected_file.exists(), f"no {expected_file.name}: run with --update-golden"
    assert out == expected_file.read_text(encoding="utf-8")
    errors = "error" in out.splitlines()[-1] and not out.splitlines()[-1].startswith("0 errors")
    assert code == (1 if errors else 0)
    named = re.match(r"AS\d{3}", case.stem)
    if named:
        assert f": {named.group()} " in out


def test_golden_files_cover_every_code():
    covered = {re.match(r"AS\d{3}", case.stem).group() for case in CASES if re.match(r"AS\d{3}", case.stem)}
    assert len(CASES) >= 40
    assert covered >= set(CODES), sorted(set(CODES) - covered)


def test_every_expected_output_has_its_input():
    assert {p.stem for p in GOLDEN.glob("*.txt")} == {p.stem for p in CASES}
