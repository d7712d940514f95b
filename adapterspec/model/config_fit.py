"""What an mlx-lm or mlx-vlm adapter config (one rank, scale and dropout for every key) can say of a plan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ConfigFit:
    """Whether a plan is expressible as another tool's adapter config, and the config or the reasons why not."""

    config: Optional[dict] = None
    reasons: list[str] = field(default_factory=list)

    @property
    def compatible(self) -> bool:
        return self.config is not None


def one_setting_reasons(entries, tool: str) -> list[str]:
    """Why the entries need more than one rank, scale or dropout, which `tool`'s config cannot give them."""
    reasons = []
    for name, values in (
        ("rank", {e.r for e in entries}),
        ("scale", {e.scale for e in entries}),
        ("dropout", {e.dropout for e in entries}),
    ):
        values.discard(None)
        if len(values) > 1:
            shown = ", ".join(f"{v:g}" for v in sorted(values))
            reasons.append(f"it uses {len(values)} different {name} values ({shown}); {tool} has one")
    return reasons
