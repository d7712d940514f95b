"""What a fuse does with every tensor of a model directory, decided from headers and configs alone (no mlx)."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..model.families import ConfigHints, unfusable_reason
from ..model.files import read_model_config, read_model_tensors, resolve_model_path, weight_files
from ..model.hf_moe import Part, StackedTensor, sanitized_tensors
from ..model.index import ModuleIndex, ModuleInfo, natural_key
from ..model.kinds import KINDS
from .adapter_source import AdaptedModule, AdapterSource
from .shards import SourceTensor, nbytes_of, read_sources, stacked_source

MODULE_TENSORS = ("weight", "scales", "biases")
MAX_SHARD_BYTES = 5 << 30
# Bytes of memory per weight element while a module is merged: the input, a float32 ΔW, the result.
WORKING_BYTES_PER_ELEMENT = 16
SHARD_METADATA = {"format": "mlx"}
ADAPTER_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class Quantization:
    group_size: int
    bits: int
    mode: str

    def describe(self) -> str:
        mode = "" if self.mode == "affine" else f" {self.mode}"
        return f"{self.bits}-bit{mode} g{self.group_size}"


@dataclass
class Unit:
    """A module whose tensors are computed: an adapter merged into it, or (--dequantize) a weight dequantized."""

    path: str
    adapter: Optional[AdaptedModule]
    base: dict[str, SourceTensor]
    adapter_tensors: dict[str, SourceTensor]
    quantization: Optional[Quantization]
    dense_dtype: str
    logical_shape: tuple[int, ...]
    requantize: bool
    # How a quantized unit is requantized: "grid" (on the input's own grid where a group fits it; the input's bits
    # where no code moves) or "plain" (every group afresh, as mlx-lm's fuse does).
    requantization: str = "grid"
    # --keep-precision fit: the finer affine quantization this unit is stored in instead of the base's.
    stored_quantization: Optional[Quantization] = None

    @property
    def output_quantization(self) -> Optional[Quantization]:
        """How the unit's weight is stored: None when dense."""
        if self.quantization is None or not self.requantize:
            return None
        return self.stored_quantization or self.quantization

    def outputs(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of every tensor this unit writes."""
        if self.stored_quantization is not None and self.requantize:
            q, lead, cols = self.stored_quantization, self.logical_shape[:-1], self.logical_shape[-1]
            return [
                (f"{self.path}.weight", "uint32", (*lead, cols * q.bits // 32)),
                (f"{self.path}.scales", self.dense_dtype, (*lead, cols // q.group_size)),
                (f"{self.path}.biases", self.dense_dtype, (*lead, cols // q.group_size)),
            ]
        if self.quantization is not None and self.requantize:
            return [(s.name, s.dtype, s.shape) for s in self.base.values()]
        return [(f"{self.path}.weight", self.dense_dtype, self.logical_shape)]

    @property
    def row_bytes(self) -> int:
        """Working memory while one row along the weight's first axis (a row; an expert of a switch) is merged."""
        return WORKING_BYTES_PER_ELEMENT * math.prod(self.logical_shape[1:])

    def row_chunks(self, max_working_bytes: int) -> list[tuple[int, int]]:
        """Ranges along the weight's first axis small enough to merge one at a time."""
        leading = self.logical_shape[0]
        step = max(1, max_working_bytes // max(self.row_bytes, 1))
        return [(start, min(start + step, leading)) for start in range(0, leading, step)]

    @property
    def base_description(self) -> str:
        return self.quantization.describe() if self.quantization else self.dense_dtype

    @property
    def output_description(self) -> str:
        q = self.output_quantization
        return q.describe() if q else self.dense_dtype


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the fused model: computed by a unit, or copied from a source file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    unit: Optional[Unit] = None
    source: Optional[SourceTensor] = None

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)


@dataclass
class Shard:
    filename: str
    tensors: list[OutputTensor]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class FusePlan:
    """Everything `fuse` will write, before a byte is read: units of work, copied tensors, the config."""

    model_dir: Path
    adapters: AdapterSource
    config: dict
    units: list[Unit]
    sources: list[SourceTensor]
    replaced: dict[str, SourceTensor]
    dequantize: bool
    quantized_bits: dict[str, int]
    notes: list[str] = field(default_factory=list)

    @property
    def fused_units(self) -> list[Unit]:
        return [u for u in self.units if u.adapter is not None]

    def keep_dense(self, paths) -> None:
        """Write these adapted modules unquantized (mixed precision), recorded per module in the config."""
        wanted = set(paths)
        for unit in self.units:
            if unit.path in wanted:
                unit.requantize = False

    def store_as(self, quantizations: dict[str, Quantization]) -> None:
        """Store these adapted modules in another (finer) quantization, recorded per module in the config."""
        for unit in self.units:
            if unit.path in quantizations:
                unit.stored_quantization = quantizations[unit.path]
                self.quantized_bits[unit.path] = quantizations[unit.path].bits

    def outputs(self) -> list[OutputTensor]:
        """Every output tensor, in the order of the input files and of the tensors inside them."""
        owner = {s.name: unit for unit in self.units for s in unit.base.values()}
        out = []
        for source in self.sources:
            unit = owner.get(source.name)
            if unit is None:
                replacement = self.replaced.get(source.name, source)
                out.append(OutputTensor(source.name, replacement.dtype, replacement.shape, source=replacement))
                continue
            for name, dtype, shape in unit.outputs():
                if name == source.name:
                    out.append(OutputTensor(name, dtype, shape, unit=unit))
            if (
                unit.stored_quantization is not None
                and source.name == f"{unit.path}.weight"
                and "biases" not in unit.base
            ):
                # A base without biases (mxfp4, ...) stored affine: its biases follow its weight.
                out += [OutputTensor(n, d, s, unit=unit) for n, d, s in unit.outputs() if n.endswith(".biases")]
        return out

    def shards(self, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Shard]:
        """The outputs split into files as mlx-lm's save_model splits them (a new file when the next tensor would overflow)."""
        groups: list[list[OutputTensor]] = []
        size = 0
        for tensor in self.outputs():
            if not groups or size + tensor.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(tensor)
            size += tensor.nbytes
        if len(groups) == 1:
            return [Shard("model.safetensors", groups[0])]
        return [Shard(f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors", g) for i, g in enumerate(groups)]

    def output_config(self) -> dict:
        """config.json of the fused model: quantization dropped (--dequantize) or marked off per kept module, and
        generation_config.json's eos_token_id carried over, as mlx-lm's fuse writes it."""
        config = copy.deepcopy(self.config)
        eos = generation_eos_token_id(self.model_dir)
        if eos is not None:
            config["eos_token_id"] = eos
        if self.dequantize:
            config.pop("quantization", None)
            config.pop("quantization_config", None)
            return config
        kept = [u.path for u in self.units if u.quantization is not None and not u.requantize]
        finer = {u.path: u.stored_quantization for u in self.units if u.requantize and u.stored_quantization}
        if (kept or finer) and isinstance(config.get("quantization"), dict):
            mirrored = config.get("quantization_config") == config["quantization"]
            for path in kept:
                config["quantization"][path] = False
            for path, q in finer.items():
                config["quantization"][path] = {"group_size": q.group_size, "bits": q.bits, "mode": q.mode}
            if mirrored:
                config["quantization_config"] = copy.deepcopy(config["quantization"])
        return config

    def index_json(self, shards: list[Shard]) -> dict:
        """model.safetensors.index.json as mlx-lm writes it: total size, parameter count, sorted weight map."""
        weight_map = {t.name: shard.filename for shard in shards for t in shard.tensors}
        return {
            "metadata": {
                "total_size": sum(s.nbytes for s in shards),
                "total_parameters": total_parameters(shards, self.quantized_bits),
            },
            "weight_map": dict(sorted(weight_map.items())),
        }


def generation_eos_token_id(model_dir: Path):
    """generation_config.json's eos_token_id (mlx-lm's load_config reads it into the config), or None."""
    path = model_dir / "generation_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError, RecursionError):
        return None
    eos = data.get("eos_token_id") if isinstance(data, dict) else None
    valid = isinstance(eos, int) or (isinstance(eos, list) and all(isinstance(e, int) for e in eos))
    return eos if valid and not isinstance(eos, bool) and eos != [] else None


def total_parameters(shards: list[Shard], quantized_bits: dict[str, int]) -> int:
    """Logical parameters as mlx-lm counts them: packed weights unpacked, quantization scales and biases left out."""
    names = {t.name for shard in shards for t in shard.tensors}
    count = 0
    for shard in shards:
        for tensor in shard.tensors:
            owner, _, param = tensor.name.rpartition(".")
            quantized = f"{owner}.scales" in names
            if quantized and param in ("scales", "biases"):
                continue
            size = math.prod(tensor.shape)
            if quantized and param == "weight":
                size = size * 32 // quantized_bits[owner]
            count += size
    return count


# ── building the plan ───────────────────────────────────────────────────────


REQUANTIZATION = ("grid", "plain")


def plan_fuse(
    model, adapters, *, dequantize: bool = False, requantization: str = "grid", check_meanwhile: bool = False
) -> FusePlan:
    """Read a model directory and the adapters (an adapter directory, or an AdapterSource from a plan in memory)
    and decide what fusing them writes; nothing is loaded. `check_meanwhile`: an adapter directory's saved plan is
    checked against its spec in a process beside this one (`AdapterSource.from_dir`), and the caller waits for `adapters.checked()`."""
    model_dir = resolve_model_path(model)
    config = read_model_config(model_dir)
    index = ModuleIndex.from_model_dir(model_dir)
    if not isinstance(adapters, AdapterSource):
        adapters = AdapterSource.from_dir(adapters, index, check_meanwhile=model_dir if check_meanwhile else None)
    with adapters.spec_check_first():
        return _plan(model_dir, config, index, adapters, dequantize, requantization)


def _plan(model_dir: Path, config: dict, index: ModuleIndex, adapters: AdapterSource, dequantize: bool,
          requantization: str) -> FusePlan:  # fmt: skip
    sources = _sources_as_sanitized(model_dir, config)
    by_name = {s.name: s for s in sources}
    adapter_sources = read_sources(adapters.weights)
    _check_quantization_config(config, index)
    _refuse_unfusable(config, adapters)
    units, replaced = _units_for_adapters(adapters, index, by_name, adapter_sources, dequantize)
    adapted = {u.path for u in units}
    if dequantize:
        units += [
            _unit(info, None, by_name, {}, False) for info in index if info.quantized and info.path not in adapted
        ]
    if requantization not in REQUANTIZATION:
        raise UserError(f"requantization must be one of {', '.join(REQUANTIZATION)}, not {requantization!r}")
    for unit in units:
        unit.requantization = requantization
    units.sort(key=lambda u: natural_key(u.path))
    bits = {info.path: info.bits for info in index if info.quantized}
    return FusePlan(model_dir, adapters, config, units, sources, replaced, dequantize, bits, list(adapters.notes))


def _sources_as_sanitized(model_dir: Path, config: dict) -> list[SourceTensor]:
    """Every tensor of the model in file order, as mlx-lm's sanitize leaves them: a Hugging Face mixture's
    per-expert tensors become one stacked tensor (at its first expert's place), tensors sanitize drops are left out.
    The fused model is therefore written in mlx-lm's stacked layout."""
    stored: list[SourceTensor] = []
    for path in weight_files(model_dir):
        stored.extend(read_sources(path).values())
    sanitized = sanitized_tensors(read_model_tensors(model_dir), config, str(model_dir))
    if not sanitized.stacked and not sanitized.dropped:
        return stored
    by_name = {s.name: s for s in stored}
    placed: dict[str, list[StackedTensor]] = {}
    for stacked in sanitized.stacked.values():
        placed.setdefault(stacked.parts[0].tensor, []).append(stacked)
    skipped = set(sanitized.dropped) | {p.tensor for t in sanitized.stacked.values() for p in t.parts}
    sources = []
    for source in stored:
        for stacked in sorted(placed.get(source.name, ()), key=lambda t: t.name):
            parts = [_part_source(by_name[p.tensor], p, stacked.info.shape[1:]) for p in stacked.parts]
            sources.append(stacked_source(stacked.name, parts))
        if source.name not in skipped:
            sources.append(source)
    return sources


def _part_source(stored: SourceTensor, part: Part, shape: tuple[int, ...]) -> SourceTensor:
    """One expert of a stacked tensor: its bytes inside the stored tensor that holds them."""
    return SourceTensor(stored.name, stored.path, stored.dtype, tuple(shape), stored.offset + part.start, part.length)


def _refuse_unfusable(config: dict, adapters: AdapterSource) -> None:
    """UserError when an adapter sits on a module whose merged weight would mean something else (NormHead)."""
    types = ConfigHints.from_config(config).model_types
    for module in adapters.modules:
        reason = unfusable_reason(types, module.path) if module.kind != "full" else None
        if reason:
            raise UserError(f"cannot fuse the adapter on '{module.path}': {reason}")


def _check_quantization_config(config: dict, index: ModuleIndex) -> None:
    if any(info.quantized for info in index) and not isinstance(config.get("quantization"), dict):
        raise UserError(
            "the model has quantized weights but its config.json has no mlx 'quantization' section",
            help="fuse reads models in mlx-lm's layout; convert the model with mlx_lm.convert first",
        )


def _units_for_adapters(adapters: AdapterSource, index, by_name, adapter_sources, dequantize):
    units: list[Unit] = []
    replaced: dict[str, SourceTensor] = {}
    claimed: set[str] = set()
    problems: list[str] = []
    for module in adapters.modules:
        info = index.modules.get(module.path)
        if module.kind == "full":
            found = {n: s for n, s in adapter_sources.items() if n.rpartition(".")[0] == module.path}
            for name, source in found.items():
                base = by_name.get(name)
                if base is None:
                    problems.append(f"'{name}' is not a tensor of the model")
                elif tuple(base.shape) != tuple(source.shape):
                    problems.append(f"'{name}' has shape {source.shape}, the model's is {base.shape}")
                else:
                    replaced[name] = source
            claimed.update(found)
            continue
        kind = KINDS.get(module.kind)
        if kind is None:
            raise UserError(f"the adapter plan names an unknown adapter kind {module.kind!r} for '{module.path}'")
        if info is None or info.family != kind.family:
            what = "no such module" if info is None else f"a {info.cls}"
            raise UserError(
                f"{adapters.origin} was made for another model: '{module.path}' ({module.kind}) is {what} in this model",
                help="fuse the adapters into the model they were trained on",
            )
        inner = len(module.rows) if module.rows is not None else module.r
        shapes = kind.shapes(info.input_dims, info.output_dims, inner, info.num_experts)
        names = {p: f"{module.path}.{p}" for p in kind.params}
        tensors = {}
        for param, name in names.items():
            source = adapter_sources.get(name)
            expected = shapes[param]
            if source is None:
                problems.append(f"'{name}' is missing")
            elif tuple(source.shape) != expected:
                problems.append(f"'{name}' has shape {source.shape}, this model needs {expected}")
            elif source.dtype not in ADAPTER_DTYPES:
                problems.append(f"'{name}' is {source.dtype}, not a floating-point tensor")
            else:
                tensors[param] = source
        claimed.update(names.values())
        units.append(_unit(info, module, by_name, tensors, not dequantize))
    unclaimed = sorted(set(adapter_sources) - claimed, key=natural_key)
    if unclaimed:
        problems.append(f"{len(unclaimed)} tensor(s) belong to no adapted module, e.g. '{unclaimed[0]}'")
    if problems:
        raise UserError(
            f"{adapters.weights} does not fit the adapter plan and this model: " + "; ".join(problems[:3]),
            help="fuse the adapters into the model they were trained on",
        )
    return units, replaced


def _unit(info: ModuleInfo, module: Optional[AdaptedModule], by_name, adapter_tensors, requantize: bool) -> Unit:
    base = {p: by_name[f"{info.path}.{p}"] for p in MODULE_TENSORS if f"{info.path}.{p}" in by_name}
    if f"{info.path}.global_scale" in by_name:
        raise UserError(
            f"'{info.path}' is quantized with a global scale (nvfp4), which fuse cannot requantize yet",
            help="fuse into the unquantized model and quantize the result with mlx_lm.convert",
        )
    weight = base["weight"]
    if not info.quantized:
        return Unit(info.path, module, {"weight": weight}, adapter_tensors, None, weight.dtype, weight.shape, False)
    quantization = Quantization(info.group_size, info.bits, info.mode or "affine")
    scales = base["scales"]
    dense_dtype = scales.dtype if quantization.mode == "affine" else "bfloat16"
    logical = tuple(weight.shape[:-1]) + (scales.shape[-1] * info.group_size,)
    return Unit(info.path, module, base, adapter_tensors, quantization, dense_dtype, logical, requantize)
