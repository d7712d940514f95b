"""LoRA merged into weights in numpy, a tile of rows at a time, with the bits of mlx's CPU path, faster.

The rank-r product is summed in the order of mlx's CPU matmul (the reference BLAS: one term after
another, separate multiplies and adds). Dense (float16, float32) weights: the base is added and the
sum rounded once. Affine-quantized weights, per tile: unpack the codes, dequantize as
`mx.dequantize` rounds, merge, round once to the scales' dtype, and quantize as `mx.quantize` does.
A tile stays in the core's cache through all of it, where mlx's CPU kernels stream the whole weight
through memory once per step.

Within a quantized tile the columns are kept in "code order": all first codes of every byte, then all
second ones, …, so that unpacking and packing touch contiguous memory; a group's elements stay
inside the group, and A's columns are permuted to match.
"""

from __future__ import annotations

import functools
import threading
from typing import Optional

import numpy as np

from . import merge_native

BITS = (2, 4, 8)
# The dtypes numpy's loops round to as mlx does: of quantization scales (the dequantized weight), of dense weights.
SCALE_DTYPES = ("float16", "float32")
DENSE_DTYPES = SCALE_DTYPES
TILE_ELEMENTS = 1 << 17
# Veltkamp's split keeps the 11 leading bits of a float32 (float16's precision), rounded to nearest even.
FLOAT16_SPLIT = np.float32(2**13 + 1)
FLOAT16_SMALLEST_NORMAL = np.float32(2.0**-14)
FLOAT16_LARGEST = 65504.0
# Adding 1.5·2²³ rounds a float32 in [0, 2²²) to an integer, which lands in the low bits of its mantissa.
ROUND_TO_INTEGER = np.float32(1.5 * 2**23)
EPSILON = np.float32(1e-7)


class Unrepresentable(ValueError):
    """A tile this path cannot round as mlx does (an overflow to ±inf, a NaN): the caller falls back to mlx."""


def supports(bits: int, group_size: int, scales_dtype: str) -> bool:
    return bits in BITS and scales_dtype in merge_dtypes() and group_size % (8 // bits) == 0


def merge_dtypes() -> tuple[str, ...]:
    """The dtypes merged here (of a dense weight, or of a quantized one's scales): bfloat16 only by the compiled kernels."""
    return SCALE_DTYPES + (("bfloat16",) if merge_native.kernels() is not None else ())


def _require_numpy_dtype(name: str) -> None:
    if name not in SCALE_DTYPES:
        raise ValueError(f"numpy's loops merge {' and '.join(SCALE_DTYPES)} weights, not {name}")


def merge_quantized(
    packed: np.ndarray,
    scales: np.ndarray,
    biases: np.ndarray,
    lora_a: np.ndarray,
    lora_b: np.ndarray,
    scale: float,
    bits: int,
    group_size: int,
    requantize: bool = True,
) -> tuple[np.ndarray, ...]:
    """Q(deq(W) + scale·(A·B)ᵀ) as (weight, scales, biases), for W (rows, cols) stored as mlx's affine quantization.

    packed (rows, cols·bits/32) uint32; scales, biases (rows, cols/group_size) float16 or float32;
    lora_a (cols, r); lora_b (r, rows). Without `requantize`: (the merged weight in the scales' dtype,).
    Raises Unrepresentable where a value overflows the scales' dtype.
    """
    return QuantizedMerge(lora_a, scale, bits, group_size).rows(packed, scales, biases, lora_b, requantize)


class QuantizedMerge:
    """One LoRA (A, scale) merged into row chunks of one quantized weight; A is prepared once for all chunks."""

    def __init__(self, lora_a: np.ndarray, scale: float, bits: int, group_size: int):
        cols = lora_a.shape[0]
        self.layout = _Layout(bits, group_size, cols // group_size)
        self.native = merge_native.kernels()
        a_t = np.ascontiguousarray(np.asarray(lora_a, dtype=np.float32).T)
        self.a_t = a_t if self.native is not None else self.layout.to_code_order(a_t)
        self.factor = np.float32(scale)

    def rows(
        self, packed, scales, biases, lora_b, requantize: bool = True, dtype: Optional[str] = None, grid: bool = False
    ) -> tuple[np.ndarray, ...]:
        """The outputs of `merge_quantized` for these rows; lora_b holds their columns of B (r, rows).

        `dtype` names the scales' dtype where their array cannot: bfloat16, as uint16 bit patterns (compiled kernels only).
        `grid`: requantize on the input's grid where a group fits it (`quantize`).
        """
        layout, name = self.layout, dtype or scales.dtype.name
        b_t = np.ascontiguousarray(np.asarray(lora_b, dtype=np.float32).T)
        if self.native is not None:
            merged = merge_native.merge_affine(
                self.native, packed, scales, biases, name, self.a_t, b_t, float(self.factor), layout.bits, layout.group_size, requantize,
                grid,
            )  # fmt: skip
            if merged is None:
                raise Unrepresentable("a merged value is not finite")
            return merged
        _require_numpy_dtype(name)
        dtype = scales.dtype
        rows, groups = scales.shape
        s32, b32 = scales.astype(np.float32), biases.astype(np.float32)
        _check_dequantizable(s32, b32, layout, dtype)
        if requantize:
            out_packed = np.empty_like(packed)
            out_scales, out_biases = np.empty((rows, groups), np.float32), np.empty((rows, groups), np.float32)
            codes_out = out_packed.view(np.uint8)
        else:
            merged = np.empty((rows, layout.cols), dtype)
        codes_in = packed.view(np.uint8)
        tile = max(1, TILE_ELEMENTS // layout.cols)
        work = _scratch(min(tile, rows), layout.cols, layout.per_byte)
        with np.errstate(all="ignore"):  # overflows are checked, not warned about
            for start in range(0, rows, tile):
                stop = min(start + tile, rows)
                w, acc, term = work.view(stop - start)
                _dequantize_tile(codes_in[start:stop], s32[start:stop], b32[start:stop], layout, dtype, w, work)
                _accumulate(acc, term, b_t[start:stop], self.a_t)
                acc *= self.factor
                acc += w
                _round_to(acc, dtype, term)
                if requantize:
                    base = (w, work.codes[: stop - start].reshape(w.shape))  # the unmoved values keep their codes
                    out_scales[start:stop], out_biases[start:stop] = _quantize_tile(
                        acc,
                        layout,
                        dtype,
                        codes_out[start:stop],
                        (s32[start:stop], b32[start:stop], *base) if grid else None,
                    )
                else:
                    _check_finite(acc, dtype)
                    merged[start:stop] = layout.from_code_order(acc)
        if requantize:
            return out_packed, out_scales.astype(dtype), out_biases.astype(dtype)
        return (merged,)


class DenseMerge:
    """One LoRA (A, scale) merged into row chunks of one dense weight: W + scale·(A·B)ᵀ, rounded once."""

    def __init__(self, lora_a: np.ndarray, scale: float):
        self.a_t = np.ascontiguousarray(np.asarray(lora_a, dtype=np.float32).T)
        self.factor = np.float32(scale)

    def rows(self, weight: np.ndarray, lora_b: np.ndarray, dtype: Optional[str] = None) -> np.ndarray:
        """The merged rows of `weight`; lora_b holds their columns of B (r, rows); `dtype` as in QuantizedMerge.rows."""
        rows, cols = weight.shape
        name = dtype or weight.dtype.name
        b_t = np.ascontiguousarray(np.asarray(lora_b, dtype=np.float32).T)
        native = merge_native.kernels()
        if native is not None:
            return _finite(merge_native.merge_dense(native, weight, name, self.a_t, b_t, float(self.factor)), name)
        _require_numpy_dtype(name)
        merged = np.empty((rows, cols), weight.dtype)
        tile = max(1, TILE_ELEMENTS // cols)
        work = _scratch(min(tile, rows), cols)
        with np.errstate(all="ignore"):  # an overflow rounds to ±inf, as in mlx
            for start in range(0, rows, tile):
                stop = min(start + tile, rows)
                w, acc, term = work.view(stop - start)
                _accumulate(acc, term, b_t[start:stop], self.a_t)
                acc *= self.factor
                _widen(weight[start:stop], w, work)
                acc += w
                np.copyto(merged[start:stop], acc, casting="unsafe")
        return _finite(merged, name)


def _finite(merged: np.ndarray, dtype: str) -> np.ndarray:
    """The merged rows, or Unrepresentable where one is ±inf or NaN (mlx then merges them, and the fuse refuses)."""
    if dtype == "bfloat16":  # uint16 bit patterns: all exponent bits set is inf or NaN
        bad = ((merged.view(np.uint16) & 0x7F80) == 0x7F80).any()
    else:
        bad = not np.isfinite(merged).all()
    if bad:
        raise Unrepresentable("a merged value is not finite")
    return merged


def dequantize(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """`mx.dequantize(...)` (affine) widened to float32, in the weight's own column order."""
    rows, groups = scales.shape
    layout = _Layout(bits, group_size, groups)
    s32, b32 = scales.astype(np.float32), biases.astype(np.float32)
    _check_dequantizable(s32, b32, layout, scales.dtype)
    work = _Scratch(rows, layout.cols, layout.per_byte)
    w, _, _ = work.view(rows)
    _dequantize_tile(packed.view(np.uint8), s32, b32, layout, scales.dtype, w, work)
    return layout.from_code_order(w)


def quantize(
    values: np.ndarray, bits: int, group_size: int, dtype: str, grid: Optional[tuple[np.ndarray, np.ndarray]] = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`mx.quantize(values.astype(dtype), ...)` (affine) as numpy arrays, for float32 values already of `dtype`'s precision.

    `grid`: the float32 scales and biases (rows, groups) of the weight the values came from. A group whose every
    value rounds to a code of that grid (0 … 2^bits − 1) is stored on it, with those scales and biases: the
    nearest representable group, and the input's own bits where the values did not move far enough to change a
    code. Other groups are quantized afresh, as mx.quantize does.
    """
    rows, cols = values.shape
    layout = _Layout(bits, group_size, cols // group_size)
    work = layout.to_code_order(values).astype(np.float32, copy=True)
    out = np.empty((rows, cols * bits // 8), np.uint8)
    with np.errstate(all="ignore"):
        scales, biases = _quantize_tile(work, layout, np.dtype(dtype), out, grid)
    return out.view(np.uint32), scales.astype(dtype), biases.astype(dtype)


class _Layout:
    """How a row's `cols` elements sit in code order: (codes per byte, groups, elements of a group per code)."""

    def __init__(self, bits: int, group_size: int, groups: int):
        self.bits, self.group_size, self.groups = bits, group_size, groups
        self.per_byte = 8 // bits
        self.per_code = group_size // self.per_byte
        self.cols = groups * group_size
        self.n_bins = np.float32((1 << bits) - 1)

    def grouped(self, x: np.ndarray) -> np.ndarray:
        """(n, cols) in code order -> (n, per_byte, groups, per_code)."""
        return x.reshape(x.shape[0], self.per_byte, self.groups, self.per_code)

    def to_code_order(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        return np.ascontiguousarray(x.reshape(n, self.cols // self.per_byte, self.per_byte).transpose(0, 2, 1)).reshape(
            n, self.cols
        )

    def from_code_order(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        return np.ascontiguousarray(x.reshape(n, self.per_byte, self.cols // self.per_byte).transpose(0, 2, 1)).reshape(
            n, self.cols
        )


class _Scratch:
    """The buffers a tile is computed in: three float32 tiles, and the unpacked codes of a quantized one
    (or the float16 bit patterns of a dense one, as table indices)."""

    def __init__(self, rows: int, cols: int, per_byte: int = 0):
        self.codes = np.empty((rows, per_byte, cols // per_byte), np.uint8) if per_byte else None
        self.indices = None if per_byte else np.empty((rows, cols), np.intp)
        self._tiles = [np.empty((rows, cols), np.float32) for _ in range(3)]

    def view(self, n: int) -> list[np.ndarray]:
        return [tile[:n] for tile in self._tiles]


_scratches = threading.local()


def _scratch(rows: int, cols: int, per_byte: int = 0) -> _Scratch:
    """This thread's scratch buffers for tiles of `rows` × `cols`, kept between merges: new ones cost page faults."""
    key = (rows, cols, per_byte)
    if getattr(_scratches, "key", None) != key:
        _scratches.key, _scratches.value = key, _Scratch(rows, cols, per_byte)
    return _scratches.value


def _widen(weight: np.ndarray, out: np.ndarray, work: _Scratch) -> None:
    """out = weight as float32. A float16 weight is looked up in a table of all 65536 values: numpy's own
    conversion runs 1.25 ns per value here, the lookup 0.68."""
    if weight.dtype != np.float16:
        np.copyto(out, weight)
        return
    indices = work.indices[: weight.shape[0]]
    np.copyto(indices, weight.view(np.uint16))
    np.take(_float16_values(), indices, out=out)


@functools.lru_cache(maxsize=None)
def _float16_values() -> np.ndarray:
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def _check_dequantizable(s32: np.ndarray, b32: np.ndarray, layout: _Layout, dtype: np.dtype) -> None:
    if not (np.isfinite(s32).all() and np.isfinite(b32).all()):
        raise Unrepresentable("non-finite scales or biases")
    if (
        dtype == np.float16
        and s32.size
        and float(np.abs(s32).max()) * float(layout.n_bins) + float(np.abs(b32).max()) >= FLOAT16_LARGEST
    ):
        raise Unrepresentable("a dequantized value may overflow float16")


def _dequantize_tile(codes: np.ndarray, s32, b32, layout: _Layout, dtype, w: np.ndarray, work: _Scratch) -> None:
    """w (n, cols, code order) = the dequantized tile, rounded where mx.dequantize rounds (scale·q, then + bias)."""
    n, bits, mask = codes.shape[0], layout.bits, (1 << layout.bits) - 1
    unpacked = work.codes[:n]
    for k in range(layout.per_byte):
        if k == 0:
            np.bitwise_and(codes, mask, out=unpacked[:, 0]) if layout.per_byte > 1 else np.copyto(unpacked[:, 0], codes)
        else:
            np.right_shift(codes, k * bits, out=unpacked[:, k])
            if k < layout.per_byte - 1:
                unpacked[:, k] &= mask
    np.copyto(w.reshape(unpacked.shape), unpacked, casting="unsafe")
    term = work.view(n)[2]
    grouped = layout.grouped(w)
    # scale·q is exact in float32 and a sum whose magnitude falls below float16's normals is exact too,
    # so a split that rounds normal numbers rounds every value here as float16 would.
    grouped *= s32[:, None, :, None]
    _round_normal(w, dtype, term)
    grouped += b32[:, None, :, None]
    _round_normal(w, dtype, term)


def _accumulate(acc: np.ndarray, term: np.ndarray, b_t: np.ndarray, a_t: np.ndarray) -> None:
    """acc = Σₖ b_t[:, k]·a_t[k], term after term, as the reference BLAS sums."""
    np.multiply(b_t[:, :1], a_t[:1], out=acc)
    for k in range(1, a_t.shape[0]):
        np.multiply(b_t[:, k : k + 1], a_t[k : k + 1], out=term)
        acc += term


def _round_normal(x: np.ndarray, dtype: np.dtype, term: np.ndarray) -> None:
    if dtype == np.float16:
        np.multiply(x, FLOAT16_SPLIT, out=term)
        np.subtract(term, x, out=x)
        np.subtract(term, x, out=x)


def _round_to(x: np.ndarray, dtype: np.dtype, term: np.ndarray) -> None:
    """x rounded in place to `dtype`'s precision as a cast rounds it (subnormals included; overflow is checked later)."""
    if dtype != np.float16:
        return
    tiny = np.less(np.abs(x, out=term), FLOAT16_SMALLEST_NORMAL)
    flat_tiny = np.flatnonzero(tiny) if tiny.any() else None
    rounded_tiny = None if flat_tiny is None else x.reshape(-1)[flat_tiny].astype(np.float16).astype(np.float32)
    _round_normal(x, dtype, term)
    if flat_tiny is not None:
        x.reshape(-1)[flat_tiny] = rounded_tiny


def _check_finite(x: np.ndarray, dtype) -> None:
    largest = float(np.abs(x).max()) if x.size else 0.0
    if not np.isfinite(largest) or (dtype == np.float16 and largest > FLOAT16_LARGEST):
        raise Unrepresentable("a merged value overflows float16 or is not a number")


def _quantize_tile(x: np.ndarray, layout: _Layout, dtype, out: np.ndarray, grid=None) -> tuple[np.ndarray, np.ndarray]:
    """Quantize x (n, cols, code order) as mx.quantize does into `out` (n, cols·bits/8 bytes); x is consumed.

    Returns the float32 scales and biases (n, groups) that mx.quantize stores in `dtype`. `grid`: as in `quantize`,
    optionally followed by the base's values and codes (n, cols, code order), of which a value not moved keeps its
    code.
    """
    grouped = layout.grouped(x)
    w_max, w_min = _group_extremes(grouped)
    _check_finite(np.maximum(np.abs(w_max), np.abs(w_min)), dtype)
    on_grid = None
    if grid is not None:
        grid_scales, grid_biases = (g[:, None, :, None] for g in grid[:2])
        grid_codes = np.rint((grouped - grid_biases) / grid_scales)
        if len(grid) == 4:  # the base's values and codes (code order): a value not moved keeps its own code
            np.copyto(grid_codes, layout.grouped(grid[3]), where=grouped == layout.grouped(grid[2]), casting="unsafe")
        fits = ((grid_codes >= 0) & (grid_codes <= layout.n_bins)).all(axis=(1, 3))
        on_grid = fits[:, None, :, None]
    mask = np.abs(w_min) > np.abs(w_max)
    scales = np.maximum((w_max - w_min) / layout.n_bins, EPSILON)
    scales = np.where(mask, scales, -scales)
    edge = np.where(mask, w_min, w_max)
    q0 = np.rint(edge / scales)
    nonzero = q0 != 0
    scales = np.where(nonzero, edge / np.where(nonzero, q0, np.float32(1)), scales)
    biases = np.where(nonzero, edge, np.float32(0))
    grouped -= biases[:, None, :, None]
    grouped /= scales[:, None, :, None]
    # Clamping before rounding gives rint-then-clamp's codes: the bounds are integers.
    np.clip(x, 0, layout.n_bins, out=x)
    if on_grid is not None:
        np.copyto(grouped, grid_codes, where=on_grid)
        scales, biases = np.where(fits, grid[0], scales), np.where(fits, grid[1], biases)
    x += ROUND_TO_INTEGER
    codes = x.view(np.uint8)[:, ::4].reshape(x.shape[0], layout.per_byte, -1)
    np.copyto(out, codes[:, -1])
    for k in range(layout.per_byte - 2, -1, -1):
        out <<= layout.bits
        out |= codes[:, k]
    return scales, biases


def _group_extremes(grouped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The max and min of every group of (n, per_byte, groups, per_code), each (n, groups)."""
    n, per_byte, groups, width = grouped.shape
    highs, lows = grouped[:, 0], grouped[:, 0]
    for k in range(1, per_byte):
        highs, lows = np.maximum(highs, grouped[:, k]), np.minimum(lows, grouped[:, k])
    # Halving runs over contiguous memory, and a reduction along the first axis too; along the last it does not.
    while width > 16 and width % 2 == 0:
        width //= 2
        highs = np.maximum(highs[..., :width], highs[..., width:])
        lows = np.minimum(lows[..., :width], lows[..., width:])
    highs = np.ascontiguousarray(highs.reshape(n * groups, width).T).max(axis=0)
    lows = np.ascontiguousarray(lows.reshape(n * groups, width).T).min(axis=0)
    return highs.reshape(n, groups), lows.reshape(n, groups)
