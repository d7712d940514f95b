"""JSON read safely: only from regular files, nesting depth bounded, every failure a UserError naming the file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import UserError
from .inputs import check_regular_file, open_regular

# No file adapterspec reads nests deeper than a few levels; this bound keeps every later walk shallow.
MAX_JSON_DEPTH = 64
MAX_JSON_BYTES = 64 * 1024 * 1024


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value of a regular file, with a UserError naming the file for anything wrong."""
    path = Path(path)
    check_regular_file(path)
    try:
        with open_regular(path) as f:
            if os.fstat(f.fileno()).st_size > max_bytes:
                raise UserError(f"{path}: the file is larger than {max_bytes} bytes", help="is this the right file?")
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise UserError(f"{path}: cannot read the file: {e.strerror or e}") from e
    return loads(raw, path)


def loads(raw: bytes | str, path: str | os.PathLike, what: str = "JSON", bound_depth: bool = True) -> Any:
    """Parse JSON text read from `path`: not UTF-8, not JSON, or nested too deeply are UserErrors naming it.

    `bound_depth=False` skips the walk that bounds the depth, for a reader that checks every value's type itself."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: {what} is not UTF-8 text ({e})", help=_FIX) from e
    try:
        value = json.loads(text)
    except RecursionError as e:
        raise UserError(f"{path}: {what} is nested too deeply", help=_FIX) from e
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: {what} is not valid JSON: {e}", help=_FIX) from e
    if bound_depth and _nesting_depth(value) > MAX_JSON_DEPTH:
        raise UserError(f"{path}: {what} is nested more than {MAX_JSON_DEPTH} levels deep", help=_FIX)
    return value


_FIX = "the file is damaged or not what its name says; write it again or download it again"


def _nesting_depth(value: Any) -> int:
    """The deepest nesting of lists and objects in a parsed value, walked with a stack (no recursion)."""
    if not isinstance(value, (dict, list)):
        return 0
    deepest, stack = 1, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return deepest
