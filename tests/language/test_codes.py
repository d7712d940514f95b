"""The registry of diagnostic codes: every emitter uses a registered code with its severity, and docs/language.md's
table lists exactly the registry (code, severity, meaning) with an anchor per code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from adapterspec.language.codes import CODES, diagnostic

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [p for p in (ROOT / "adapterspec").rglob("*.py") if p.name != "codes.py"]
DOC = (ROOT / "docs" / "language.md").read_text(encoding="utf-8")
ROW = re.compile(r'^\| <a id="(as\d{3})"></a>(AS\d{3}) \| (\w+) \| (.*?) \|', re.M)


def emitted_codes() -> set[str]:
    return {code for path in SOURCES for code in re.findall(r'"(AS\d{3})"', path.read_text(encoding="utf-8"))}


def test_every_code_the_package_emits_is_registered_and_every_registered_code_is_emitted():
    assert emitted_codes() == set(CODES)


def test_the_docs_table_is_the_registry():
    rows = ROW.findall(DOC)
    assert [(code, severity, title) for _anchor, code, severity, title in rows] == [
        (c.code, c.severity.value, c.title) for c in CODES.values()
    ]
    assert all(anchor == CODES[code].anchor for anchor, code, _s, _t in rows)


@pytest.mark.parametrize("code", sorted(CODES))
def test_a_diagnostic_takes_its_severity_from_the_registry(code):
    assert diagnostic(code, "message").severity is CODES[code].severity


def test_an_unregistered_code_cannot_be_emitted():
    with pytest.raises(KeyError):
        diagnostic("AS999", "message")
