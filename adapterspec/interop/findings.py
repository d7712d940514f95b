"""Findings of a translation: what the target format cannot say (lossy) and what the user should know (note)."""

from __future__ import annotations

from dataclasses import dataclass

from ..model.names import safe_comment

LOSSY, NOTE = "lossy", "note"


@dataclass(frozen=True)
class Finding:
    """One thing a translation could not carry over exactly (lossy) or wants to point out (note)."""

    severity: str
    message: str

    @property
    def lossy(self) -> bool:
        return self.severity == LOSSY

    def render(self) -> str:
        return f"{'warning' if self.lossy else 'note'}: {self.message}"


def lossy(message: str) -> Finding:
    return Finding(LOSSY, message)


def note(message: str) -> Finding:
    return Finding(NOTE, message)


def as_comments(findings: list[Finding]) -> list[str]:
    """The findings as spec comment lines, so they travel with the spec file (a line break inside stays escaped)."""
    return [f"# {safe_comment(f.render())}" for f in findings]
