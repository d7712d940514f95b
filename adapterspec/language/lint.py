"""The spec-only pipeline (parse → validate → static checks) and its Python API; never imports mlx."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .checks import static_checks
from .diagnostics import Diagnostic, SpecError, has_errors, sort_key
from .parse import decode, parse_text, strip_bom
from .validate import CheckedSpec, check_tree

if TYPE_CHECKING:
    from .spec import Spec


def diagnose(text: str, filename: str = "<spec>") -> tuple[Optional[CheckedSpec], list[Diagnostic]]:
    """Every diagnostic of one spec text, sorted, and the checked spec when it has no errors.

    Builds no pydantic model, which keeps `adapterspec lint` quick to start.
    """
    tree, diagnostics = parse_text(strip_bom(text), filename)
    checked, validation = check_tree(tree)
    diagnostics += validation
    if checked is not None:
        diagnostics += static_checks(checked)
    if has_errors(diagnostics):
        checked = None
    return checked, sorted(diagnostics, key=sort_key)


def diagnose_bytes(
    data: bytes, filename: str, size: Optional[int] = None
) -> tuple[Optional[CheckedSpec], list[Diagnostic], Optional[str]]:
    """Like `diagnose` for a file's bytes; also returns the decoded text (None when it could not be decoded).

    `size` is the file's full size when `data` holds only its beginning.
    """
    text, diagnostics = decode(data, filename, size)
    if text is None:
        return None, diagnostics, None
    checked, diagnostics = diagnose(text, filename)
    return checked, diagnostics, text


def _to_spec(checked: Optional[CheckedSpec]) -> Optional["Spec"]:
    if checked is None:
        return None
    from .spec import spec_from_checked

    return spec_from_checked(checked)


def check_text(text: str, filename: str = "<spec>") -> tuple[Optional["Spec"], list[Diagnostic]]:
    """Every diagnostic of one spec text, and the `Spec` when it has no errors."""
    checked, diagnostics = diagnose(text, filename)
    return _to_spec(checked), diagnostics


def check_bytes(data: bytes, filename: str) -> tuple[Optional["Spec"], list[Diagnostic], Optional[str]]:
    """Like `check_text` for a file's bytes (AS100/AS105 for binary, non-UTF-8 or oversized input)."""
    checked, diagnostics, text = diagnose_bytes(data, filename)
    return _to_spec(checked), diagnostics, text


def lint_text(text: str, filename: str = "<spec>") -> list[Diagnostic]:
    """All diagnostics (errors and warnings) of a spec text, in source order."""
    return diagnose(text, filename)[1]


def parse_spec(text: str, filename: str = "<spec>") -> "Spec":
    """Parse and validate a spec text; raise SpecError holding every diagnostic when it has errors."""
    spec, diagnostics = check_text(text, filename)
    if spec is None:
        raise SpecError(diagnostics, strip_bom(text))
    return spec


def load_spec(path: str | Path) -> "Spec":
    """Read, parse and validate a spec file; raise SpecError (with all diagnostics) when it has errors."""
    path = Path(path)
    spec, diagnostics, text = check_bytes(path.read_bytes(), str(path))
    if spec is None:
        raise SpecError(diagnostics, text)
    return spec
