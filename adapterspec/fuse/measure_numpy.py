"""The erasure measure of plain LoRA in numpy, on a fuse's worker processes (never mlx): units of one shape and storage
together, on evenly spaced column groups of their sampled rows (quantization groups run along a row, so whole
groups keep their exact values). For a few sampled rows, a dozen small mlx operations per unit cost more in dispatch
than in work; on a process of its own the measure leaves the fuse's interpreter to the pipeline."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from . import merge_numpy
from .numpy_scope import DENSE_GROUP, MAX_SAMPLED_GROUPS, sampled_rows
from .report import Measurement, Survival

if TYPE_CHECKING:
    from .plan import Unit
    from .shards import SourceFiles


def measure_lora(
    units: list[Unit], lora: dict[str, np.ndarray], files: SourceFiles, limit: int
) -> dict[str, Measurement]:
    """The Measurement of each of `units` (`numpy_scope.numpy_measures`, one batch of `numpy_batches`), by path;
    `lora` holds their float32 A and B by tensor name. Raises merge_numpy.Unrepresentable (mlx measures them then)."""
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
        quantized = None if q is None else _survival(requantized_stored[rows], requantized_base[rows], intended[rows])
        dense = _survival(stored[rows], weight[rows], intended[rows])
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


def _survival(stored: np.ndarray, reference: np.ndarray, intended: np.ndarray) -> Survival:
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
