"""What the numpy side of a fuse takes on, decided without importing numpy: the quantizations and dtypes its loops
round as mlx does, the units whose erasure it measures and the rows and column groups it samples, and the error for
a tile it cannot round. The main process of a fuse on a GPU imports neither numpy nor the loops."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .plan import Unit

BITS = (2, 4, 8)
# The dtypes numpy's loops round to as mlx does: of quantization scales (the dequantized weight), of dense weights.
SCALE_DTYPES = ("float16", "float32")
MAX_SAMPLED_ROWS = 32
# Of those rows, numpy measures this many evenly spaced groups of columns (of DENSE_GROUP on a dense weight).
MAX_SAMPLED_GROUPS = 16
DENSE_GROUP = 64
# numpy measures units of one shape together, about this many sampled elements at a time.
BATCH_ELEMENTS = 1 << 20


class Unrepresentable(ValueError):
    """A tile this path cannot round as mlx does (an overflow to ±inf, a NaN): the caller falls back to mlx."""


def packs(bits: int, group_size: int) -> bool:
    """Whether numpy's loops unpack and pack this affine quantization (whole bytes of codes in every group)."""
    return bits in BITS and group_size % (8 // bits) == 0


def sampled_rows(total: int, limit: int = MAX_SAMPLED_ROWS) -> list[int]:
    """Up to `limit` evenly spaced row indices, first and last included."""
    if total <= limit:
        return list(range(total))
    return sorted({round(i * (total - 1) / (limit - 1)) for i in range(limit)})


def numpy_measures(unit: Unit) -> bool:
    """Plain LoRA on a float16/float32 weight, or on an affine-quantized one numpy's loops unpack."""
    q = unit.quantization
    if unit.adapter.kind != "lora" or unit.dense_dtype not in SCALE_DTYPES:
        return False
    return q is None or (q.mode == "affine" and "biases" in unit.base and packs(q.bits, q.group_size))


def numpy_batches(units: list[Unit], limit: int = MAX_SAMPLED_ROWS) -> list[list[Unit]]:
    """The units `numpy_measures`, in batches of one shape and storage of about BATCH_ELEMENTS sampled elements."""
    batches: dict[tuple, list[list[Unit]]] = {}
    for unit in units:
        if numpy_measures(unit):
            batch = batches.setdefault((unit.quantization, unit.dense_dtype, unit.logical_shape[-1]), [[]])
            if len(batch[-1]) * limit * MAX_SAMPLED_GROUPS * DENSE_GROUP >= BATCH_ELEMENTS:
                batch.append([])
            batch[-1].append(unit)
    return [b for same in batches.values() for b in same]
