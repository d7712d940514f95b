"""What a fuse merges: the adapted modules of a plan and their weights file; an adapter directory's saved plan is
used at once while a process beside the fuse checks it against the directory's spec planned on the model."""

from __future__ import annotations

import json
import subprocess
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import ContextManager, Iterator, Optional

from ..errors import UserError
from ..model.adapter_format import ADAPTER_WEIGHTS, check_weights_file, plan_of, read_adapter_config
from ..model.index import ModuleIndex
from ..model.kinds import TOKEN_KINDS
from ..processes import python_module


@dataclass(frozen=True)
class AdaptedModule:
    """One module of the adapter plan: its path, adapter kind (or 'full'), rank and scale."""

    path: str
    kind: str
    r: Optional[int] = None
    scale: Optional[float] = None
    rows: Optional[tuple[int, ...]] = None  # the rows a tokens adapter writes

    def describe(self) -> str:
        if self.rows is not None:
            return f"{self.kind} ({len(self.rows)} rows)"
        return self.kind if self.r is None else f"{self.kind} r={self.r}"


@dataclass(frozen=True)
class AdapterSource:
    """What a fuse merges: the adapted modules (from a plan) and the safetensors file holding their weights.

    `origin` is what the user named (an adapter directory, or the weights file): messages name it, and the
    output may not overlap it. `spec_check` is set when the modules come from an adapter directory's saved plan
    that is still being checked: whoever fuses them waits for it before publishing anything."""

    modules: tuple[AdaptedModule, ...]
    weights: Path
    origin: Path
    notes: tuple[str, ...] = ()
    spec_check: Optional[SpecCheck] = field(default=None, compare=False, repr=False)

    @classmethod
    def from_plan(cls, plan, weights) -> AdapterSource:
        """A plan in memory (`model.plan.Plan`, or its entries' JSON) with the weights file it goes with."""
        entries = plan.to_json()["modules"] if hasattr(plan, "to_json") else plan
        return cls(modules_of(entries), Path(weights), Path(weights))

    @classmethod
    def from_dir(cls, adapter_dir, index: ModuleIndex, *, check_meanwhile: Optional[Path] = None) -> AdapterSource:
        """An adapter directory: our saved plan, or mlx-lm's keys translated on this model.

        The saved plan must be what the directory's spec plans on this model (`plan_of`, which imports and runs
        the spec language). `check_meanwhile`, the model directory `index` was read from: a saved plan that holds
        all a fuse needs is used as it is, and the check starts in a process of its own (`spec_check`, which the
        caller waits for through `checked()` before it publishes anything)."""
        adapter_dir = Path(adapter_dir)
        config = read_adapter_config(adapter_dir)
        weights = adapter_dir / ADAPTER_WEIGHTS
        saved = saved_modules(config) if check_meanwhile is not None else None
        if saved is None:
            plan, notes = plan_of(config, index, adapter_dir)
            modules = cls.from_plan(plan, weights).modules
            return cls(modules, check_weights_file(weights), adapter_dir, tuple(notes))
        spec_check = SpecCheck(check_meanwhile, adapter_dir)
        with spec_check.reported_first():
            return cls(saved, check_weights_file(weights), adapter_dir, spec_check=spec_check)

    def spec_check_first(self) -> ContextManager:
        """A block whose errors yield to the spec check's (`SpecCheck.reported_first`); any block without a check."""
        return self.spec_check.reported_first() if self.spec_check else nullcontext()

    def checked(self) -> Optional[AdapterSource]:
        """Wait for the spec check, if any, raising its error; the source of the spec's plan where it differs from
        the saved plan in what a fuse uses (an edited scale or rows), None where the modules are right."""
        if self.spec_check is None:
            return None
        planned = modules_of(self.spec_check.entries())
        return None if planned == self.modules else AdapterSource(planned, self.weights, self.origin)


def modules_of(entries) -> tuple[AdaptedModule, ...]:
    """The adapted modules of a plan's entries (as JSON)."""
    try:
        return tuple(
            AdaptedModule(
                m["path"], m["adapter"], m.get("r"), m.get("scale"), tuple(m["rows"]) if m.get("rows") else None
            )
            for m in entries
        )
    except (KeyError, TypeError) as error:
        raise UserError(f"the adapter config's plan is damaged ({error})") from error


def saved_modules(config: dict) -> Optional[tuple[AdaptedModule, ...]]:
    """The modules of the plan saved in an adapter config (checked by read_adapter_config); None where there is none,
    or where it lacks what a fuse needs (a tokens adapter's rows, absent from plans saved before they were)."""
    saved = (config.get("adapterspec") or {}).get("plan")
    if saved is None or any(m["adapter"] in TOKEN_KINDS and not m.get("rows") for m in saved["modules"]):
        return None
    return modules_of(saved["modules"])


class SpecCheck:
    """`plan_of` in a process of its own, started at once. Planning imports the spec language (pydantic, Lark), which
    was most of a fuse's start-up; in a process of its own it runs beside the fuse on another core instead of taking
    turns with the fuse's threads for Python's global lock."""

    def __init__(self, model_dir: Path, adapter_dir: Path):
        command, env = python_module("adapterspec.fuse.spec_check", str(model_dir), str(adapter_dir))
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        self._answer: dict | None = None

    def entries(self) -> list[dict]:
        """Wait for the check: the entries of the spec's plan on the model (as JSON), or plan_of's UserError."""
        if self._answer is None:
            out, err = self._process.communicate()
            try:
                self._answer = json.loads(out)
            except ValueError:
                self._answer = {"failed": f"exit status {self._process.returncode}: {err.decode(errors='replace')}"}
        if "error" in self._answer:
            raise UserError(**self._answer["error"])
        if "failed" in self._answer:
            raise RuntimeError(f"the check of the adapters' saved plan failed ({self._answer['failed'][-4000:]})")
        return self._answer["modules"]

    @contextmanager
    def reported_first(self) -> Iterator[None]:
        """An error of the block waits for the check, and the check's error, if any, is raised instead: the fuse
        reports what it reported when the check came before everything else."""
        try:
            yield
        except Exception:
            self.entries()
            raise
