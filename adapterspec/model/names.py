"""Values read from other tools' configs: module names, numbers, and messages that never echo injected text."""

from __future__ import annotations

import math
import re
from typing import Any, Optional

MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
LINE_BREAKS = {"\n": "a line break", "\r": "a carriage return", "\t": "a tab"}
MAX_SHOWN = 60


def type_name(value: Any) -> str:
    """How a JSON (or YAML) value is called in a message: 'a string', 'a list', 'null', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {shown_number(value)}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def shown_number(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, float) and math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:12]}…({len(text)} digits)"


def shown(value: Any) -> str:
    """A value for a message: short printable strings quoted, anything else described (never a line break)."""
    if isinstance(value, str):
        if len(value) <= MAX_SHOWN and value.isprintable() and "#" not in value and ":" not in value:
            return f"'{value}'"
        return "a string with " + (_first_bad(value) or f"{len(value)} characters")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return shown_number(value)
    return type_name(value)


def _first_bad(value: str) -> Optional[str]:
    for char in value:
        if not char.isprintable() or char in "#:":
            return describe_char(char)
    return None


def describe_char(char: str) -> str:
    if char in LINE_BREAKS:
        return LINE_BREAKS[char]
    return f"'{char}'" if char.isprintable() else f"the control character U+{ord(char):04X}"


def name_problem(value: Any) -> Optional[str]:
    """Why `value` is not a module name such as `self_attn.q_proj` (None when it is one); the message quotes at
    most the part before the first character that does not belong, so rule text inside never reaches the output."""
    if not isinstance(value, str):
        return f"is {type_name(value)}, not a module name"
    if not value:
        return "is empty, not a module name"
    if MODULE_NAME.fullmatch(value):
        return None
    for position, char in enumerate(value):
        if not (char.isascii() and (char.isalnum() or char in "._")):
            before = value[:position][-MAX_SHOWN:]
            where = f" after '{before}'" if before else " at its start"
            return f"has {describe_char(char)}{where}, which is no part of a module name"
    return f"'{value}' has an empty part between dots"


def is_count(value: Any) -> bool:
    """A whole number that is not a boolean (JSON's true is 1 in Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def number_problem(
    value: Any, *, whole: bool = False, positive: bool = False, below_one: bool = False
) -> Optional[str]:
    """Why `value` is not the number a field needs (None when it is); the phrase follows the field's name."""
    if whole:
        if not is_count(value):
            return f"is {type_name(value)}, not a whole number"
        if positive and value <= 0:
            return f"is {value}, not a positive whole number"
        return None
    if not is_finite_number(value):
        return f"is {type_name(value)}, not a finite number"
    if positive and value <= 0:
        return f"is {shown_number(value)}, not a positive number"
    if below_one and not 0 <= value < 1:
        return f"is {shown_number(value)}, not in [0, 1)"
    return None


def safe_comment(text: str) -> str:
    """Text for one comment line: characters that could end the line (or are invisible) written as escapes."""
    return "".join(char if char.isprintable() else f"\\u{ord(char):04x}" for char in text)
