"""How much of each adapter survives being stored: measured on evenly spaced rows of every fused module.

For a module with base weight W and adapter change ΔW (the float32 merge minus W), the stored weight S
realises the change D = S − B against the base stored the same way: B = W when S is rounded to the
dense dtype, B = Q(W) (requantized, which is not exactly W) when S = Q(W + ΔW). We report

* kept  = ⟨D, ΔW⟩ / ‖ΔW‖²: the share of the adapter the stored weight carries (1: all, 0: none);
* error = ‖D − ΔW‖ / ‖ΔW‖: the relative error of the stored change, which is also the expected
  relative error of the module's added output on random Gaussian inputs.

Rows are independent under every merge (DoRA normalises per row) and every quantization mode
(groups run along a row), so a sample of rows gives the exact values of those rows; for plain LoRA,
whose elements are independent too, whole quantization groups of those rows are sampled (in numpy,
units of one shape together).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import replace
from typing import Callable

import mlx.core as mx
import numpy as np

from ..adapters import fusemath
from ..model.kinds import DORA_KINDS, SWITCH_KINDS, TOKEN_KINDS
from . import merge_numpy
from .merge_mlx import adapter_rows, merge, requantize, token_slots
from .plan import FusePlan, Quantization, Unit
from .report import Measurement, Survival, status_of
from .shards import SourceFiles, SourceTensor

MAX_SAMPLED_ROWS = 32
# Of those rows, numpy measures this many evenly spaced groups of columns (of DENSE_GROUP on a dense weight).
MAX_SAMPLED_GROUPS = 16
DENSE_GROUP = 64
# numpy measures units of one shape together, about this many sampled elements at a time.
BATCH_ELEMENTS = 1 << 20
MAX_MEASURING_THREADS = 4


def sampled_rows(total: int, limit: int = MAX_SAMPLED_ROWS) -> list[int]:
    """Up to `limit` evenly spaced row indices, first and last included."""
    if total <= limit:
        return list(range(total))
    return sorted({round(i * (total - 1) / (limit - 1)) for i in range(limit)})


def measure(
    plan: FusePlan, adapters: dict[str, mx.array], files: SourceFiles, limit: int = MAX_SAMPLED_ROWS
) -> list[Measurement]:
    """A Measurement of every unit that merges an adapter, in the plan's order."""
    return measure_meanwhile(plan, adapters, files, limit).result()


class PendingMeasurements:
    """Measurements begun by `measure_meanwhile`."""

    def __init__(self, units: list[Unit], numpy_parts: list[Future], finish: Callable[[Unit], Measurement]):
        self._units, self._numpy_parts, self._finish = units, numpy_parts, finish

    def wait(self) -> None:
        """Wait for the threads (before the files they read are closed), whatever became of them."""
        wait(self._numpy_parts)

    def result(self) -> list[Measurement]:
        """Every Measurement in the plan's order: the threads', and the rest measured now with mlx."""
        measured = {}
        for part in self._numpy_parts:
            measured.update(part.result())
        return [measured.get(unit.path) or self._finish(unit) for unit in self._units]


def measure_meanwhile(
    plan: FusePlan, adapters: dict[str, mx.array], files: SourceFiles, limit: int = MAX_SAMPLED_ROWS
) -> PendingMeasurements:
    """`measure`, begun now: the units numpy measures (plain LoRA, most of a fuse) on threads of their own while the
    caller goes on; the rest are measured with mlx when the result is asked for, on the calling thread (whose
    streams mlx's arrays belong to)."""
    units = plan.fused_units
    batches: dict[tuple, list[list[Unit]]] = {}
    for unit in units:
        if _numpy_measures(unit):
            batch = batches.setdefault((unit.quantization, unit.dense_dtype, unit.logical_shape[-1]), [[]])
            if len(batch[-1]) * limit * MAX_SAMPLED_GROUPS * DENSE_GROUP >= BATCH_ELEMENTS:
                batch.append([])
            batch[-1].append(unit)
    # Read here: mlx stays on this thread.
    names = {
        u.adapter_tensors[p].name for same in batches.values() for b in same for u in b for p in ("lora_a", "lora_b")
    }
    lora = {name: np.asarray(adapters[name].astype(mx.float32)) for name in names}

    def in_numpy(batch: list[Unit]) -> dict[str, Measurement]:
        try:
            return _measure_lora_in_numpy(batch, lora, files, limit)
        except merge_numpy.Unrepresentable:  # an overflow to ±inf: mlx measures these units
            return {}

    every_batch = [b for same in batches.values() for b in same]
    numpy_parts = []
    if every_batch:
        threads = ThreadPoolExecutor(min(len(every_batch), measuring_threads()), thread_name_prefix="fuse-measure")
        numpy_parts = [threads.submit(in_numpy, batch) for batch in every_batch]
        threads.shutdown(wait=False)

    return PendingMeasurements(units, numpy_parts, lambda unit: _measure_unit(unit, adapters, files, limit))


def measuring_threads() -> int:
    """Threads for the numpy measure: a quarter of the cores, at most four (numpy's elementwise work releases the
    GIL); one on a small machine, where the merges need the cores."""
    return max(1, min(MAX_MEASURING_THREADS, (os.cpu_count() or 1) // 4))


def _numpy_measures(unit: Unit) -> bool:
    """Plain LoRA on a float16/float32 weight, or on an affine-quantized one `merge_numpy` handles."""
    q = unit.quantization
    if unit.adapter.kind != "lora" or unit.dense_dtype not in merge_numpy.SCALE_DTYPES:
        return False
    return q is None or (
        q.mode == "affine" and "biases" in unit.base and merge_numpy.supports(q.bits, q.group_size, unit.dense_dtype)
    )


def _measure_lora_in_numpy(
    units: list[Unit], lora: dict[str, np.ndarray], files: SourceFiles, limit: int
) -> dict[str, Measurement]:
    """`_measure_unit` for units `_numpy_measures` of one shape and storage, all at once, on evenly spaced column groups
    of their sampled rows (quantization groups run along a row, so whole groups keep their exact values).

    For a few sampled rows, a dozen small mlx operations per unit cost more in dispatch than in work.
    """
    samples = [_lora_sample(unit, lora, files, limit) for unit in units]
    q, dtype = units[0].quantization, units[0].dense_dtype
    weight = np.concatenate([w for w, _, _ in samples])
    merged = weight + np.concatenate([d for _, d, _ in samples])
    intended = merged - weight
    with np.errstate(over="ignore"):  # an overflow is stored as ±inf, as in the fused weight
        stored = merged.astype(dtype).astype(np.float32)
    if q is not None:
        grid = None
        if units[0].requantization == "grid":
            grid = tuple(np.concatenate([g[i] for _, _, g in samples]) for i in range(2))

        # Plain requantizing is not exact even without an adapter; measure against the requantized base (on its
        # own grid, the base itself).
        def requantized(values: np.ndarray) -> np.ndarray:
            return merge_numpy.dequantize(
                *merge_numpy.quantize(values, q.bits, q.group_size, dtype, grid), q.bits, q.group_size
            )

        requantized_stored, requantized_base = requantized(stored), requantized(weight)
    measurements, start = {}, 0
    for unit, (w, _, _) in zip(units, samples):
        rows = slice(start, start + w.shape[0])
        start = rows.stop
        quantized = (
            None if q is None else _numpy_survival(requantized_stored[rows], requantized_base[rows], intended[rows])
        )
        dense = _numpy_survival(stored[rows], weight[rows], intended[rows])
        measurements[unit.path] = Measurement(unit.path, w.shape[0], unit.base["weight"].rows, dense, quantized)
    return measurements


def _lora_sample(
    unit: Unit, lora: dict[str, np.ndarray], files: SourceFiles, limit: int
) -> tuple[np.ndarray, np.ndarray, tuple]:
    """The sampled rows and column groups of a unit's weight (float32, of its dtype's values), of its ΔW, and the
    float32 scales and biases of those groups (empty for a dense weight)."""
    rows = sampled_rows(unit.base["weight"].rows, limit)
    base = {
        param: np.frombuffer(files.read_rows(source, rows), source.dtype).reshape(len(rows), -1)
        for param, source in unit.base.items()
    }
    q, cols = unit.quantization, unit.logical_shape[-1]
    group_size = q.group_size if q else (DENSE_GROUP if cols % DENSE_GROUP == 0 else cols)
    groups = cols // group_size
    chosen = sampled_rows(groups, MAX_SAMPLED_GROUPS)
    columns = (np.asarray(chosen)[:, None] * group_size + np.arange(group_size)).ravel()
    grid: tuple = ()
    if q is None:
        weight = base["weight"][:, columns].astype(np.float32)
    else:
        packed = base["weight"].reshape(len(rows), groups, -1)[:, chosen].reshape(len(rows), -1)
        scales, biases = (base[p].reshape(len(rows), groups)[:, chosen] for p in ("scales", "biases"))
        weight = merge_numpy.dequantize(packed, scales, biases, q.bits, q.group_size)
        grid = (scales.astype(np.float32), biases.astype(np.float32))
    a, b = (lora[unit.adapter_tensors[p].name] for p in ("lora_a", "lora_b"))
    return weight, np.einsum("cr,rn->nc", a[columns], b[:, rows]) * np.float32(unit.adapter.scale), grid


def _numpy_survival(stored: np.ndarray, reference: np.ndarray, intended: np.ndarray) -> Survival:
    realised = (stored - reference).astype(np.float64).ravel()
    wanted = intended.astype(np.float64).ravel()
    norm2 = _dot(wanted, wanted)
    if norm2 == 0.0:
        return Survival(None, None)
    miss = realised - wanted
    return Survival(_dot(realised, wanted) / norm2, (_dot(miss, miss) / norm2) ** 0.5)


def _dot(x: np.ndarray, y: np.ndarray) -> float:
    # einsum, not BLAS (here and for ΔW above): every BLAS call wakes one BLAS thread per core, which then
    # spins. With BLAS, a CPU fuse on a 16-core host measured in 1.35 s instead of 0.66, using 20 s of CPU instead of 3.6.
    return float(np.einsum("i,i->", x, y))


def _measure_unit(unit: Unit, adapters: dict[str, mx.array], files: SourceFiles, limit: int) -> Measurement:
    sample = _RowSample(unit, adapters, files, limit)
    dense = _survival(sample.stored, sample.w32, sample.intended)
    quantized, q = None, unit.quantization
    if q is not None:
        # Plain requantizing is not exact even without an adapter; measure against the requantized base (on its own
        # grid, the base itself).
        grid = sample.base if unit.requantization == "grid" else None
        requantized_base = sample.requantized(sample.weight, q, grid).astype(mx.float32).reshape(sample.w32.shape)
        quantized = _survival(sample.requantized(sample.stored, q, grid), requantized_base, sample.intended)
    return Measurement(unit.path, len(sample.rows), unit.base["weight"].rows, dense, quantized)


class _RowSample:
    """The sampled rows of a unit: base tensors, weight (its dtype and float32), intended change and merged weight."""

    def __init__(self, unit: Unit, adapters: dict[str, mx.array], files: SourceFiles, limit: int):
        self.rows = sampled_rows(unit.base["weight"].rows, limit)
        self.base = {param: _rows_array(files, source, self.rows) for param, source in unit.base.items()}
        q = unit.quantization
        weight = _dequantize(self.base, q) if q else self.base["weight"]
        kind, scale = unit.adapter.kind, unit.adapter.scale
        self.weight, adapter = _row_problem(kind, unit, weight, adapters, self.rows)
        self.w32 = self.weight.astype(mx.float32)
        self.intended = _merge(kind, self.w32, adapter, scale) - self.w32
        self.stored = _merge(kind, self.weight, adapter, scale)

    def requantized(self, values: mx.array, q: Quantization, grid=None) -> mx.array:
        return _dequantize(requantize(values.reshape(len(self.rows), -1), q, grid), q)


# --keep-precision fit: the affine quantizations tried, cheapest first (bits per weight, each group's scale and bias
# in the base's scale dtype included), among those that cost more than the base's own.
FIT_BITS = (2, 3, 4, 5, 6, 8)
FIT_GROUP_SIZES = (128, 64, 32)


def fit_candidates(unit: Unit) -> list[Quantization]:
    """Affine only, and only for an affine base: a module whose tensors differ from its neighbours' in other blocks
    (biases where they have none) would make the model's blocks unlike each other, which loaders refuse."""
    q, cols = unit.quantization, unit.logical_shape[-1]
    if q.mode != "affine" or "biases" not in unit.base:
        return []
    per_group = 2 * 8 * (4 if unit.dense_dtype == "float32" else 2)

    def cost(bits: int, group_size: int) -> float:
        return bits + per_group / group_size

    own = cost(q.bits, q.group_size)

    found = [(cost(b, g), b, g) for b in FIT_BITS for g in FIT_GROUP_SIZES if cols % g == 0 and cost(b, g) > own]
    return [Quantization(g, b, "affine") for _, b, g in sorted(found)]


def fit(
    plan: FusePlan, adapters: dict[str, mx.array], files: SourceFiles, measurements: list[Measurement],
    limit: int = MAX_SAMPLED_ROWS,
) -> tuple[dict[str, Quantization], list[str], list[Measurement]]:  # fmt: skip
    """--keep-precision fit: for each requantized module whose adapter its base's quantization does not keep ("ok"),
    the cheapest finer affine quantization that keeps it, measured on the same rows against the base weight
    (what the fused model changes), else dense. Returns (finer quantizations, dense paths, updated measurements)."""
    units = {u.path: u for u in plan.fused_units}
    finer, dense, updated = {}, [], []
    for m in measurements:
        unit = units[m.path]
        if m.quantized is None or not unit.requantize or status_of(m.quantized) in ("ok", "zero"):
            updated.append(m)
            continue
        sample = _RowSample(unit, adapters, files, limit)
        for q in fit_candidates(unit):
            survival = _survival(sample.requantized(sample.stored, q), sample.w32, sample.intended)
            if status_of(survival) == "ok":
                finer[unit.path] = q
                updated.append(replace(m, quantized=survival))
                break
        else:
            dense.append(unit.path)
            updated.append(m)
    return finer, dense, updated


def _dequantize(parts: dict[str, mx.array], q) -> mx.array:
    return mx.dequantize(
        parts["weight"], parts["scales"], parts.get("biases"), group_size=q.group_size, bits=q.bits, mode=q.mode
    )


def _rows_array(files: SourceFiles, source: SourceTensor, rows: list[int]) -> mx.array:
    raw = mx.array(memoryview(files.read_rows(source, rows))).reshape(len(rows), -1)
    return raw.view(getattr(mx, source.dtype)).reshape(len(rows), source.shape[-1])


def _row_problem(kind: str, unit: Unit, weight: mx.array, adapters: dict[str, mx.array], rows: list[int]):
    """The weight rows and the adapter slices whose merge gives exactly those rows of the full merge."""
    adapter = {param: adapters[source.name] for param, source in unit.adapter_tensors.items()}
    if kind in TOKEN_KINDS:
        adapter["slots"] = token_slots(unit)
    index = mx.array(rows)
    if kind not in SWITCH_KINDS:
        return weight, adapter_rows(kind, adapter, index)
    out_dims = adapter["lora_b"].shape[1]
    experts, outs = index // out_dims, index % out_dims
    rows = {"lora_a": adapter["lora_a"][experts], "lora_b": adapter["lora_b"][experts, outs][:, None, :]}
    if "m" in adapter:
        rows["m"] = adapter["m"][experts, outs][:, None]
    return weight[:, None, :], rows


def _merge(kind: str, weight: mx.array, adapter: dict[str, mx.array], scale: float) -> mx.array:
    if kind in TOKEN_KINDS:
        return merge(kind, weight, adapter, scale)
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
