"""Golden files of the model-dependent diagnostics: tests/model/golden/MODEL/NAME.aspec and the exact text
`adapterspec lint --model examples/models/MODEL` prints for it (NAME.txt).

Rewrite the expected outputs with `pytest tests/model/test_golden_model.py --update-golden`, then read the diff.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import models
import pytest

from adapterspec.cli import main
from adapterspec.language.codes import CODES

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden"
CASES = sorted(GOLDEN.glob("*/*.aspec"))
# AS307 needs a model with two towers and AS308 a tied embedding, which no example model has: tests/model covers
# them; AS315 needs an afm7 model (tests/adapters/test_odd_architectures.py).
WITHOUT_EXAMPLE_MODEL = {"AS307", "AS308", "AS315"}


@pytest.fixture
def update(request) -> bool:
    return request.config.getoption("--update-golden") or os.environ.get("ADAPTERSPEC_UPDATE_GOLDEN") == "1"


@pytest.mark.parametrize("case", CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_lint_with_a_model_prints_the_golden_text(case, capsys, monkeypatch, update):
    model = models.example_model_dir(case.parent.name)
    monkeypatch.chdir(HERE)
    code = main(["lint", str(case.relative_to(HERE)), "--model", os.path.relpath(model, HERE)])
    captured = capsys.readouterr()
    assert captured.err == ""
    expected = case.with_suffix(".txt")
    if update:
        expected.write_text(captured.out, encoding="utf-8", newline="\n")
    assert captured.out == expected.read_text(encoding="utf-8")
    named = re.match(r"AS\d{3}", case.stem)
    if named:
        assert f": {named.group()} " in captured.out
    errors = named is not None and CODES[named.group()].severity.value == "error"
    assert code == (1 if errors else 0)


def test_every_model_code_has_a_golden_file():
    covered = {re.match(r"AS\d{3}", case.stem).group() for case in CASES if re.match(r"AS\d{3}", case.stem)}
    model_codes = {code for code in CODES if code.startswith("AS3")}
    assert model_codes - WITHOUT_EXAMPLE_MODEL <= covered, sorted(model_codes - WITHOUT_EXAMPLE_MODEL - covered)


def test_a_statically_overridden_rule_is_reported_once_with_a_model():
    text = (GOLDEN / "tiny-moe" / "AS401-static-once.txt").read_text(encoding="utf-8")
    assert text.count(": AS401 ") == 1
