"""The spec-only pipeline (parse → validate → static checks) and its Python API; never imports mlx."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .checks import static_checks
from .diagnostics import Diagnostic, SpecError, has_errors, sort_key
from .parse import decode, parse_text
from .spec import Spec, validate


def check_text(text: str, filename: str = "<spec>") -> tuple[Optional[Spec], list[Diagnostic]]:
    """Every diagnostic of one spec text, and the Spec when it has no errors."""
    tree, diagnostics = parse_text(text, filename)
    spec, validation = validate(tree)
    diagnostics += validation
    if spec is not None:
        diagnostics += static_checks(spec)
    if has_errors(diagnostics):
        spec = None
    return spec, sorted(diagnostics, key=sort_key)


def check_bytes(data: bytes, filename: str) -> tuple[Optional[Spec], list[Diagnostic], Optional[str]]:
    text, diagnostics = decode(data, filename)
    if text is None:
        return None, diagnostics, None
    spec, diagnostics = check_text(text, filename)
    return spec, diagnostics, text


def lint_text(text: str, filename: str = "<spec>") -> list[Diagnostic]:
    """All diagnostics (errors, warnings) of a spec text."""
    return check_text(text, filename)[1]


def parse_spec(text: str, filename: str = "<spec>") -> Spec:
    """Parse and validate a spec text; raise SpecError holding every diagnostic when it has errors."""
    spec, diagnostics = check_text(text, filename)
    if spec is None:
        raise SpecError(diagnostics, text)
    return spec


def load_spec(path: str | Path) -> Spec:
    """Read, parse and validate a spec file; raise SpecError (with all diagnostics) when it has errors."""
    path = Path(path)
    spec, diagnostics, text = check_bytes(path.read_bytes(), str(path))
    if spec is None:
        raise SpecError(diagnostics, text)
    return spec
