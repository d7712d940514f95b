"""How much of each adapter survives being stored: measured on evenly spaced rows of every fused module.

For a module with base weight W and adapter change ΔW (the float32 merge minus W), the stored weight S
realises the change D = S − B against the base stored the same way: B = W when S is rounded to the
dense dtype, B = Q(W) (requantized, which is not exactly W) when S = Q(W + ΔW). We report

* kept  = ⟨D, ΔW⟩ / ‖ΔW‖²: the share of the adapter the stored weight carries (1: all, 0: none);
* error = ‖D − ΔW‖ / ‖ΔW‖: the relative error of the stored change, which is also the expected
  relative error of the module's added output on random Gaussian inputs.

Rows are independent under every merge (DoRA normalises per row) and every quantization mode
(groups run along a row), so a sample of rows gives the exact values of those rows.
"""

from __future__ import annotations

import mlx.core as mx

from .adapters import fusemath
from .fuse_io import SourceFiles, SourceTensor
from .fuse_kernels import adapter_rows, requantize
from .fuse_plan import DORA_KINDS, FusePlan, Unit
from .fuse_report import Measurement, Survival

MAX_SAMPLED_ROWS = 32


def sampled_rows(total: int, limit: int = MAX_SAMPLED_ROWS) -> list[int]:
    """Up to `limit` evenly spaced row indices, first and last included."""
    if total <= limit:
        return list(range(total))
    return sorted({round(i * (total - 1) / (limit - 1)) for i in range(limit)})


def measure(plan: FusePlan, adapters: dict[str, mx.array], files: SourceFiles, limit: int = MAX_SAMPLED_ROWS) -> list[Measurement]:
    """A Measurement of every unit that merges an adapter."""
    return [_measure_unit(unit, adapters, files, limit) for unit in plan.fused_units]


def _measure_unit(unit: Unit, adapters: dict[str, mx.array], files: SourceFiles, limit: int) -> Measurement:
    weight_source = unit.base["weight"]
    rows = sampled_rows(weight_source.rows, limit)
    base = {param: _rows_array(files, source, rows) for param, source in unit.base.items()}
    q = unit.quantization
    weight = _dequantize(base, q) if q else base["weight"]
    kind, scale = unit.adapter.kind, unit.adapter.scale
    weight, adapter = _row_problem(kind, unit, weight, adapters, rows)
    w32 = weight.astype(mx.float32)
    intended = _merge(kind, w32, adapter, scale) - w32
    stored = _merge(kind, weight, adapter, scale)
    dense = _survival(stored, w32, intended)
    quantized = None
    if q is not None:
        # Requantizing is not exact even without an adapter; measure against the requantized base.
        requantized_base = _dequantize(requantize(weight, q), q).astype(mx.float32).reshape(w32.shape)
        quantized = _survival(_dequantize(requantize(stored, q), q), requantized_base, intended)
    return Measurement(unit.path, len(rows), weight_source.rows, dense, quantized)


def _dequantize(parts: dict[str, mx.array], q) -> mx.array:
    return mx.dequantize(parts["weight"], parts["scales"], parts.get("biases"), group_size=q.group_size, bits=q.bits, mode=q.mode)


def _rows_array(files: SourceFiles, source: SourceTensor, rows: list[int]) -> mx.array:
    raw = mx.array(memoryview(files.read_rows(source, rows))).reshape(len(rows), -1)
    return raw.view(getattr(mx, source.dtype)).reshape(len(rows), source.shape[-1])


def _row_problem(kind: str, unit: Unit, weight: mx.array, adapters: dict[str, mx.array], rows: list[int]):
    """The weight rows and the adapter slices whose merge gives exactly those rows of the full merge."""
    adapter = {param: adapters[source.name] for param, source in unit.adapter_tensors.items()}
    index = mx.array(rows)
    if kind != "switch-lora":
        return weight, adapter_rows(kind, adapter, index)
    out_dims = adapter["lora_b"].shape[1]
    experts, outs = index // out_dims, index % out_dims
    return weight[:, None, :], {"lora_a": adapter["lora_a"][experts], "lora_b": adapter["lora_b"][experts, outs][:, None, :]}


def _merge(kind: str, weight: mx.array, adapter: dict[str, mx.array], scale: float) -> mx.array:
    if kind in DORA_KINDS:
        return fusemath.dora_fused_weight(kind, weight, adapter["lora_a"], adapter["lora_b"], adapter["m"], scale)
    return fusemath.fused_weight(kind, weight, adapter["lora_a"], adapter["lora_b"], scale)


def _survival(stored: mx.array, reference: mx.array, intended: mx.array) -> Survival:
    """How much of `intended` the change from `reference` to `stored` carries."""
    realised = stored.astype(mx.float32).reshape(intended.shape) - reference
    norm2 = mx.sum(intended * intended)
    along = mx.sum(realised * intended)
    miss2 = mx.sum(mx.square(realised - intended))
    mx.eval(norm2, along, miss2)
    if norm2.item() == 0.0:
        return Survival(None, None)
    return Survival(along.item() / norm2.item(), (miss2.item() / norm2.item()) ** 0.5)
