"""The erasure report of a fuse: per module how much of the adapter the stored weights keep, as a table or JSON."""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from typing import Optional

from ..tables import format_table
from .plan import FusePlan

LOST_BELOW = 0.5
PARTIAL_BELOW = 0.9
# error = ‖stored change − ΔW‖ / ‖ΔW‖. At 1 the stored change is no closer to the adapter than no change at all
# (tiny adapters under requantization noise: kept in the thousands, error too); above 0.5 it is a partial copy.
LOST_ERROR_FROM = 1.0
PARTIAL_ERROR_ABOVE = 0.5
STATUS_ORDER = ("lost", "partial", "ok", "zero")
LISTED_MODULES = 12


@dataclass(frozen=True)
class Survival:
    """kept and error of one way of storing a module (None when the adapter changes nothing)."""

    kept: Optional[float]
    error: Optional[float]


@dataclass(frozen=True)
class Measurement:
    """The survival of one module's adapter stored dense and (on a quantized base) requantized."""

    path: str
    rows: int
    total_rows: int
    dense: Survival
    quantized: Optional[Survival]


def status_of(survival: Survival) -> str:
    """zero, lost, partial or ok, from both measures: a kept share near 1 with a large error is noise, not the adapter."""
    if survival.kept is None:
        return "zero"
    if survival.kept < LOST_BELOW or survival.error >= LOST_ERROR_FROM:
        return "lost"
    return "partial" if survival.kept < PARTIAL_BELOW or survival.error > PARTIAL_ERROR_ABOVE else "ok"


def describe_lost() -> str:
    """What "lost" means, for messages."""
    return f"keep less than {LOST_BELOW:.0%} of their adapter or store a change no closer to it than none"


@dataclass(frozen=True)
class ModuleReport:
    """One fused module: what it is stored as and how much of its adapter survives that."""

    path: str
    adapter: str
    base: str
    stored: str
    kept: Optional[float]
    error: Optional[float]
    status: str
    rows: int
    total_rows: int
    requantized: bool = False
    kept_if_requantized: Optional[float] = None

    def to_json(self) -> dict:
        data = {
            "path": self.path,
            "adapter": self.adapter,
            "base": self.base,
            "stored": self.stored,
            "kept": self.kept,
            "error": self.error,
            "status": self.status,
            "rows_measured": self.rows,
            "rows": self.total_rows,
        }
        if self.kept_if_requantized is not None:
            data["kept_if_requantized"] = self.kept_if_requantized
        return data


@dataclass
class ErasureReport:
    modules: list[ModuleReport]

    def with_status(self, status: str) -> list[ModuleReport]:
        return [m for m in self.modules if m.status == status]

    @property
    def lost(self) -> list[ModuleReport]:
        return self.with_status("lost")

    def to_json(self) -> dict:
        counts = {status: len(self.with_status(status)) for status in STATUS_ORDER}
        return {
            "thresholds": {
                "lost_below": LOST_BELOW,
                "partial_below": PARTIAL_BELOW,
                "lost_error_from": LOST_ERROR_FROM,
                "partial_error_above": PARTIAL_ERROR_ABOVE,
            },
            "counts": counts,
            "modules": [m.to_json() for m in self.modules],
        }

    def render(self, full: bool = False) -> str:
        """A table grouped by module name across blocks, then the modules that lose most of their adapter."""
        if not self.modules:
            return "no adapter modules were fused"
        lines = [_table(_group_rows(self.modules) if not full else _module_rows(self.modules))]
        flagged = self.lost + self.with_status("partial")
        if flagged and not full:
            lines.append("")
            lines.append("modules that lose part of their adapter:")
            for m in flagged[:LISTED_MODULES]:
                lines.append(f"  {m.path}: keeps {_percent(m.kept)} as {m.stored} ({m.status})")
            if len(flagged) > LISTED_MODULES:
                lines.append(f"  … and {len(flagged) - LISTED_MODULES} more (see --report-json)")
        return "\n".join(lines)


def build_report(plan: FusePlan, measurements: list[Measurement]) -> ErasureReport:
    """The report for the plan as it stands (after any --keep-precision decisions)."""
    units = {u.path: u for u in plan.fused_units}
    modules = []
    for m in measurements:
        unit = units[m.path]
        requantized = unit.quantization is not None and unit.requantize
        survival = m.quantized if requantized else m.dense
        kept_if_requantized = m.quantized.kept if m.quantized is not None and not requantized else None
        modules.append(ModuleReport(
            m.path, unit.adapter.describe(), unit.base_description, unit.output_description,
            survival.kept, survival.error, status_of(survival), m.rows, m.total_rows, requantized, kept_if_requantized,
        ))  # fmt: skip
    return ErasureReport(modules)


def modules_to_keep_dense(plan: FusePlan, measurements: list[Measurement]) -> list[str]:
    """--keep-precision auto: the requantized modules that would lose most of their adapter."""
    units = {u.path: u for u in plan.fused_units}
    return [
        m.path
        for m in measurements
        if m.quantized is not None and units[m.path].requantize and status_of(m.quantized) == "lost"
    ]


def _percent(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def _error(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.3f}"


def _pattern(path: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".*", path)


def _group_rows(modules: list[ModuleReport]) -> list[list[str]]:
    groups: dict[tuple, list[ModuleReport]] = {}
    for m in modules:
        groups.setdefault((_pattern(m.path), m.adapter, m.stored), []).append(m)
    rows = []
    for (pattern, adapter, stored), members in groups.items():
        kept = [m.kept for m in members if m.kept is not None]
        errors = [m.error for m in members if m.error is not None]
        worst = min((m.status for m in members), key=STATUS_ORDER.index)
        rows.append([
            pattern, str(len(members)), adapter, stored,
            _percent(min(kept)) if kept else "—", _percent(statistics.median(kept)) if kept else "—",
            _error(max(errors)) if errors else "—", worst,
        ])  # fmt: skip
    return rows


def _module_rows(modules: list[ModuleReport]) -> list[list[str]]:
    return [
        [m.path, "1", m.adapter, m.stored, _percent(m.kept), _percent(m.kept), _error(m.error), m.status]
        for m in modules
    ]


def _table(rows: list[list[str]]) -> str:
    headers = ["modules", "n", "adapter", "stored as", "kept min", "kept median", "error max", "status"]
    return format_table(headers, rows, right={1, 4, 5, 6})
