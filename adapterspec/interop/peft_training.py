"""PEFT's `trainable_token_indices` ↔ `tokens([...])` rules and `token_rows` tensors, and `init_lora_weights` ↔
`init=`, both ways.

PEFT keeps the trained rows' values (not differences) as `<embedding>.token_adapter.trainable_tokens_delta`
(n, dims), in the order of the indices, as `token_rows` is; a tied output head reads the same tensor."""

from __future__ import annotations

from typing import Optional

from ..errors import UserError
from ..model.index import ModuleIndex
from ..model.kinds import TOKEN_KINDS

PEFT_SUFFIX = ".token_adapter.trainable_tokens_delta"
DEFAULT_MODULE = "embed_tokens"


def token_indices(config: dict) -> dict[str, list[int]]:
    """Embedding module name → its trainable rows (a plain list in PEFT means the input embedding)."""
    value = config.get("trainable_token_indices")
    if not value:
        return {}
    found = value if isinstance(value, dict) else {DEFAULT_MODULE: value}
    for name, rows in found.items():
        if not isinstance(rows, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in rows):
            raise UserError(
                f"trainable_token_indices for '{name}' is not a list of row numbers",
                help="PEFT's trainable_token_indices is a list of ints, or a mapping of module names to such lists",
            )
    return found


def row_list(rows: list[int]) -> str:
    """`[5, 300:302]`: the rows in their order, consecutive runs written as ranges."""
    parts, start = [], 0
    while start < len(rows):
        end = start
        while end + 1 < len(rows) and rows[end + 1] == rows[end] + 1:
            end += 1
        parts.append(str(rows[start]) if end - start < 2 else f"{rows[start]}:{rows[end] + 1}")
        if 0 < end - start < 2:
            parts.append(str(rows[end]))
        start = end + 1
    return "[" + ", ".join(parts) + "]"


def token_rules(config: dict, selector_for) -> list[str]:
    """The `tokens([...])` rules a PEFT config's trainable_token_indices stands for (last: they decide)."""
    return [f"{selector_for(name)}: tokens({row_list(rows)})" for name, rows in sorted(token_indices(config).items())]


def with_init(text: str, config: dict) -> str:
    """The spec text with `init=gaussian` on its defaults lines when PEFT's adapter started that way (PiSSA and
    OLoRA adapters are read as saved: converted ones say `true`, unconverted ones get a note on import)."""
    if str(config.get("init_lora_weights", True)).lower() != "gaussian":
        return text
    lines = []
    for line in text.split("\n"):
        for kind in ("lora", "dora"):
            if line == f"defaults {kind}":
                line = f"defaults {kind}(init=gaussian)"
            elif line.startswith(f"defaults {kind}(") and line.endswith(")"):
                line = line[:-1] + ", init=gaussian)"
        lines.append(line)
    return "\n".join(lines)


def peft_token_key(key: str) -> Optional[str]:
    """The Hugging Face module path of a PEFT token-rows tensor key (prefix removed), or None for other keys."""
    return key[: -len(PEFT_SUFFIX)] if key.endswith(PEFT_SUFFIX) else None


def exported_indices(plan, index: ModuleIndex) -> Optional[dict[str, list[int]] | list[int]]:
    """PEFT's trainable_token_indices for the plan's tokens entries: a plain list for the input embedding alone."""
    entries = [e for e in plan.entries if e.adapter in TOKEN_KINDS]
    if not entries:
        return None
    found = {e.path.rsplit(".", 1)[-1]: list(e.rows) for e in entries}
    if list(found) == [DEFAULT_MODULE]:
        return found[DEFAULT_MODULE]
    return found
