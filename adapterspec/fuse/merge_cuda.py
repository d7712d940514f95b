"""Fused CUDA kernels for a GPU fuse's commonest chunk: LoRA merged into a dense or affine-quantized linear weight,
and the result requantized on the base's grid, each one kernel instead of a hundred-odd mlx operations.

They compute what `merge_mlx`'s operations compute, bit for bit (the tests compare them on a CUDA GPU): every
product and sum rounds once in float32 in the operations' order (`__fmul_rn`, `__fadd_rn`: never contracted into
a fused multiply-add), the dequantize rounds where `mx.dequantize` rounds, and the grid's codes are `rint` of an
IEEE division, as mlx's own kernels compute them. Their code is built once per machine (`cuda_build`) and run
through `mx.fast.precompiled_cuda_kernel`; each build is checked against the operations on random rows before its
first use, and one that fails to build or differs is not used. Elsewhere (Metal, other adapter kinds and modes)
`merge_mlx`'s operations run; `ADAPTERSPEC_FUSE_KERNELS=0` makes them run here too.
"""

from __future__ import annotations

import functools
import os
import struct
from typing import TYPE_CHECKING, Optional

import mlx.core as mx

from ..model.kinds import DORA_KINDS, LINEAR_KINDS
from . import cuda_build, merge_mlx

if TYPE_CHECKING:
    from .plan import Quantization, Unit

KERNEL_BITS = (2, 4, 8)
FLOAT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
THREADS = 256
# Columns one thread of the merge computes along a dense row (a quantized row: one packed word's).
DENSE_COLUMNS = 8

# Each float dtype as the kernels hold it: C type, widening to float, rounding a float to it (nearest even).
CONVERSIONS = """
__device__ __forceinline__ float f16_to_float(unsigned short h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ unsigned short float_to_f16(float f) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ float bf16_to_float(unsigned short h) { return __uint_as_float(((unsigned)h) << 16); }
__device__ __forceinline__ unsigned short float_to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
__device__ __forceinline__ float f32_to_float(float f) { return f; }
__device__ __forceinline__ float float_to_f32(float f) { return f; }
"""
C_TYPES = {mx.float16: ("unsigned short", "f16"), mx.bfloat16: ("unsigned short", "bf16"), mx.float32: ("float", "f32")}

# One thread per packed word (QUANT) or DENSE_COLUMNS columns (dense) of one row: the weight dequantized (QUANT),
# plus scale · Σₖ bᵀ[i,k]·a[j,k] summed term after term, rounded to the weight's dtype (W) and then to OUT.
MERGE_SOURCE = """
extern "C" __global__ void NAME(const W_T* w, const S_T* scales, const S_T* biases, const float* a, const float* bt,
                                OUT_T* out, int rows, int cols, float scale) {
    const int E = QUANT ? 32 / BITS : DENSE_COLUMNS;
    const int per_row = (cols + E - 1) / E;
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)rows * per_row) return;
    const int i = (int)(t / per_row);
    const int j0 = (int)(t % per_row) * E;
    float bv[R];
    for (int k = 0; k < R; ++k) bv[k] = bt[(size_t)i * R + k];
#if QUANT
    const unsigned word = w[(size_t)i * (cols / E) + j0 / E];
    const size_t g = (size_t)i * (cols / GROUP) + j0 / GROUP;
    const float group_scale = S_TO_FLOAT(scales[g]);
    const float group_bias = S_TO_FLOAT(biases[g]);
#endif
    for (int e = 0; e < E; ++e) {
        const int j = j0 + e;
        if (j >= cols) break;
#if QUANT
        const float code = (float)((word >> (e * BITS)) & ((1u << BITS) - 1u));
        float base = S_TO_FLOAT(FLOAT_TO_S(__fmul_rn(code, group_scale)));
        base = S_TO_FLOAT(FLOAT_TO_S(__fadd_rn(base, group_bias)));
#else
        const float base = W_TO_FLOAT(w[(size_t)i * cols + j]);
#endif
        const float* aj = a + (size_t)j * R;
        float delta = __fmul_rn(bv[0], aj[0]);
        for (int k = 1; k < R; ++k) delta = __fadd_rn(delta, __fmul_rn(bv[k], aj[k]));
        out[(size_t)i * cols + j] = FLOAT_TO_OUT(W_TO_FLOAT(FLOAT_TO_W(__fadd_rn(base, __fmul_rn(scale, delta)))));
    }
}
"""

# One thread per group: the merged values' codes on the base's grid (its scale and bias), a value equal to the base's
# own keeping its own code; a group whose every code is representable is stored on it, any other keeps mx.quantize's
# fresh words, scale and bias.
GRID_SOURCE = """
extern "C" __global__ void NAME(const D_T* merged, const D_T* base_scales, const D_T* base_biases,
                                const unsigned* base_weight, const unsigned* fresh_weight, const D_T* fresh_scales,
                                const D_T* fresh_biases, unsigned* out_weight, D_T* out_scales, D_T* out_biases,
                                int rows, int groups) {
    const int PER_WORD = 32 / BITS;
    const int WORDS = GROUP / PER_WORD;
    const float top = (float)((1 << BITS) - 1);
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)rows * groups) return;
    const float s = D_TO_FLOAT(base_scales[t]);
    const float z = D_TO_FLOAT(base_biases[t]);
    const size_t row = t / groups;
    const D_T* x = merged + row * groups * GROUP + (t % groups) * GROUP;
    const size_t first_word = row * groups * WORDS + (t % groups) * WORDS;
    unsigned words[GROUP / (32 / BITS)];
    bool fits = true;
    for (int w = 0; w < WORDS; ++w) {
        const unsigned own_word = base_weight[first_word + w];
        unsigned word = 0;
        for (int e = 0; e < PER_WORD; ++e) {
            const float value = D_TO_FLOAT(x[w * PER_WORD + e]);
            const unsigned own = (own_word >> (e * BITS)) & ((1u << BITS) - 1u);
            const float base = D_TO_FLOAT(FLOAT_TO_D(__fadd_rn(D_TO_FLOAT(FLOAT_TO_D(__fmul_rn((float)own, s))), z)));
            const float code = value == base ? (float)own : rintf(__fdiv_rn(__fsub_rn(value, z), s));
            fits = fits && code >= 0.f && code <= top;
            word |= (unsigned)fminf(fmaxf(code, 0.f), top) << (e * BITS);
        }
        words[w] = word;
    }
    for (int w = 0; w < WORDS; ++w) out_weight[first_word + w] = fits ? words[w] : fresh_weight[first_word + w];
    out_scales[t] = fits ? base_scales[t] : fresh_scales[t];
    out_biases[t] = fits ? base_biases[t] : fresh_biases[t];
}
"""


def enabled() -> bool:
    """Whether this process merges with the kernels: on a CUDA GPU, unless ADAPTERSPEC_FUSE_KERNELS=0."""
    return os.environ.get("ADAPTERSPEC_FUSE_KERNELS", "1") != "0" and _cuda_default()


def _cuda_default() -> bool:
    return mx.default_device().type == mx.DeviceType.gpu and mx.cuda.is_available()


def merges(unit: Unit, adapter: dict[str, mx.array]) -> bool:
    """Whether the merge kernel computes this unit: plain LoRA on a linear whose weight is float, or affine-quantized
    at 2, 4 or 8 bits with float scales and biases, with float adapters."""
    kind = unit.adapter.kind if unit.adapter is not None else None
    if kind not in LINEAR_KINDS or kind in DORA_KINDS:
        return False
    if any(adapter[p].dtype not in FLOAT_DTYPES or adapter[p].ndim != 2 for p in ("lora_a", "lora_b")):
        return False
    q = unit.quantization
    if q is None:
        return _float(unit.base["weight"].dtype) and len(unit.logical_shape) == 2
    return _affine_kernel_bits(q) and "biases" in unit.base and _float(unit.base["scales"].dtype)


def requantizes_on_grid(weight: mx.array, q: Quantization, base: dict[str, mx.array]) -> bool:
    """Whether the grid kernel requantizes these rows: affine at 2, 4 or 8 bits, with scales and biases of the merged
    weight's dtype."""
    return (
        _affine_kernel_bits(q)
        and weight.ndim == 2
        and "biases" in base
        and base["scales"].shape == base["biases"].shape == (weight.shape[0], weight.shape[1] // q.group_size)
        and base["scales"].dtype == base["biases"].dtype == weight.dtype
    )


def _float(dtype_name: str) -> bool:
    return dtype_name in ("float16", "bfloat16", "float32")


def _affine_kernel_bits(q: Quantization) -> bool:
    return q.mode == "affine" and q.bits in KERNEL_BITS and q.group_size % (32 // q.bits) == 0


def _defines(**values) -> str:
    return "".join(f"#define {name} {value}\n" for name, value in values.items())


def _dtype_macros(prefix: str, dtype: mx.Dtype) -> str:
    c_type, short = C_TYPES[dtype]
    return _defines(**{f"{prefix}_T": c_type, f"{prefix}_TO_FLOAT": f"{short}_to_float",
                       f"FLOAT_TO_{prefix}": f"float_to_{short}"})  # fmt: skip


@functools.lru_cache(maxsize=None)
def _merge_kernel(quantized: bool, bits: int, group: int, rank: int, w: mx.Dtype, s: mx.Dtype, out: mx.Dtype):
    """(name, GPU code) of the merge kernel for one combination of its compile-time constants."""
    name = f"adapterspec_merge_{int(quantized)}_{bits}_{group}_{rank}_{C_TYPES[w][1]}_{C_TYPES[s][1]}_{C_TYPES[out][1]}"
    source = (
        _defines(NAME=name, QUANT=int(quantized), BITS=bits, GROUP=group, R=rank, DENSE_COLUMNS=DENSE_COLUMNS)
        + (_defines(W_T="unsigned", W_TO_FLOAT="f32_to_float", FLOAT_TO_W="float_to_f32") if quantized else "")
        + (_dtype_macros("W", w) if not quantized else "")
        + _dtype_macros("S", s)
        + _dtype_macros("OUT", out)
        + CONVERSIONS
        + MERGE_SOURCE
    )
    return name, cuda_build.cubin(source)


@functools.lru_cache(maxsize=None)
def _grid_kernel(bits: int, group: int, dtype: mx.Dtype):
    """(name, GPU code) of the grid kernel for one quantization and dtype."""
    name = f"adapterspec_grid_{bits}_{group}_{C_TYPES[dtype][1]}"
    source = _defines(NAME=name, BITS=bits, GROUP=group) + _dtype_macros("D", dtype) + CONVERSIONS + GRID_SOURCE
    return name, cuda_build.cubin(source)


def merge(
    weight: mx.array,
    lora_a: mx.array,
    lora_b_rows: mx.array,
    scale: float,
    dtype: mx.Dtype,
    quantized: Optional[tuple[mx.array, mx.array, Quantization]] = None,
) -> mx.array:
    """W + scale·(BᵀAᵀ) for the rows of `lora_b_rows` (r, rows), rounded to the weight's dtype and then to `dtype`;
    with `quantized` (scales, biases, quantization), `weight` is the packed rows, dequantized first in float32."""
    a = lora_a.astype(mx.float32)
    bt = lora_b_rows.T.astype(mx.float32)
    rows, rank = bt.shape
    cols = a.shape[0]
    if quantized is None:
        scales = biases = mx.zeros((1,), dtype=mx.float32)
        name, code = _merge_kernel(False, 4, 32, rank, weight.dtype, mx.float32, dtype)
        per_thread = DENSE_COLUMNS
    else:
        scales, biases, q = quantized
        name, code = _merge_kernel(True, q.bits, q.group_size, rank, mx.float32, scales.dtype, dtype)
        per_thread = 32 // q.bits
    threads = rows * -(-cols // per_thread)
    return mx.fast.precompiled_cuda_kernel(
        name=name,
        compiled_source=code,
        inputs=[weight, scales, biases, a, bt],
        output_shapes=[(rows, cols)],
        output_dtypes=[dtype],
        scalars=[rows, cols, as_float32(scale)],
        grid=(-(-threads // THREADS) * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        ensure_row_contiguous=True,
    )[0]


def as_float32(value: float) -> float:
    """`value` rounded to float32 as mlx rounds a Python scalar (the kernels' scalars must be exact float32s)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def requantize_on_grid(merged: mx.array, q: Quantization, base: dict[str, mx.array]) -> dict[str, mx.array]:
    """`merge_mlx.requantize(merged, q, base)` for affine 2, 4, 8 bits: fresh groups from mx.quantize, the rest on
    the base's grid, in one kernel after the quantize."""
    fresh = mx.quantize(merged, group_size=q.group_size, bits=q.bits, mode=q.mode)
    rows, groups = base["scales"].shape
    threads = rows * groups
    name, code = _grid_kernel(q.bits, q.group_size, merged.dtype)
    weight, scales, biases = mx.fast.precompiled_cuda_kernel(
        name=name,
        compiled_source=code,
        inputs=[merged, base["scales"], base["biases"], base["weight"], *fresh],
        output_shapes=[fresh[0].shape, base["scales"].shape, base["scales"].shape],
        output_dtypes=[mx.uint32, base["scales"].dtype, base["scales"].dtype],
        scalars=[rows, groups],
        grid=(-(-threads // THREADS) * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        ensure_row_contiguous=True,
    )
    return {"weight": weight, "scales": scales, "biases": biases}


def compute_chunk(
    unit: Unit, base: dict[str, mx.array], adapters: dict[str, mx.array], rows: Optional[tuple[int, int]] = None
) -> dict[str, mx.array]:
    """`merge_mlx.compute_chunk`, through the kernels where they apply and have passed their check."""
    if not enabled() or unit.adapter is None:
        return merge_mlx.compute_chunk(unit, base, adapters, rows)
    adapter = merge_mlx.unit_adapter(unit, adapters, rows)
    q, dtype = unit.quantization, getattr(mx, unit.dense_dtype)
    scales_dtype = None if q is None else base["scales"].dtype
    if not (
        merges(unit, adapter) and merge_agrees(base["weight"].dtype, adapter["lora_a"].shape[1], dtype, q, scales_dtype)
    ):
        return merge_mlx.compute_chunk(unit, base, adapters, rows)
    quantized = None if q is None else (base["scales"], base["biases"], q)
    weight = merge(base["weight"], adapter["lora_a"], adapter["lora_b"], float(unit.adapter.scale), dtype, quantized)
    stored = unit.output_quantization
    on_grid = stored is not None and unit.requantization == "grid" and unit.stored_quantization is None
    if on_grid and requantizes_on_grid(weight, stored, base) and grid_agrees(stored, weight.dtype):
        return {f"{unit.path}.{param}": value for param, value in requantize_on_grid(weight, stored, base).items()}
    return merge_mlx.outputs(unit, weight, base)


@functools.lru_cache(maxsize=None)
def merge_agrees(
    weight_dtype: mx.Dtype, rank: int, dtype: mx.Dtype, q: Optional[Quantization], scales_dtype: Optional[mx.Dtype]
) -> bool:
    """Whether `merge`, built for these dtypes, rank and quantization, gives the operations' bits on random rows."""
    try:
        keys = iter(mx.random.split(mx.random.key(0), 3))
        rows, cols = 8, 72 if q is None else 2 * q.group_size
        dense = mx.random.normal((rows, cols), key=next(keys)) * 0.02
        a = mx.random.normal((cols, rank), key=next(keys)) * 0.1
        b = mx.random.normal((rank, rows), key=next(keys)) * 0.05
        if q is None:
            weight = widened = dense.astype(weight_dtype)
            quantized = None
        else:
            weight, scales, biases = mx.quantize(dense.astype(scales_dtype), group_size=q.group_size, bits=q.bits)
            quantized = (scales, biases, q)
            widened = merge_mlx.dequantize_float32(weight, scales, biases, q)
        expected = merge_mlx.merge("lora", widened, {"lora_a": a, "lora_b": b}, 2.0, dtype)
        return same_bits(merge(weight, a, b, 2.0, dtype, quantized), expected)
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def grid_agrees(q: Quantization, dtype: mx.Dtype) -> bool:
    """Whether `requantize_on_grid` gives `merge_mlx.on_base_grid`'s bits for this quantization and dtype, on random
    groups of which some leave the grid."""
    try:
        keys = iter(mx.random.split(mx.random.key(1), 2))
        dense = (mx.random.normal((8, 4 * q.group_size), key=next(keys)) * 0.02).astype(dtype)
        weight, scales, biases = mx.quantize(dense, group_size=q.group_size, bits=q.bits)
        base = {"weight": weight, "scales": scales, "biases": biases}
        moved = merge_mlx.dequantize(weight, scales, biases, q)
        moved = mx.where(mx.random.uniform(shape=moved.shape, key=next(keys)) < 0.01, moved * 3, moved)
        fresh = dict(zip(("weight", "scales", "biases"), mx.quantize(moved, group_size=q.group_size, bits=q.bits)))
        expected = merge_mlx.on_base_grid(moved, fresh, base, q)
        got = requantize_on_grid(moved, q, base)
        return all(same_bits(got[p], expected[p]) for p in expected)
    except Exception:
        return False


def same_bits(x: mx.array, y: mx.array) -> bool:
    """Whether two arrays hold the same dtype, shape and bits (NaNs included)."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    unsigned = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}[x.dtype.size]
    return bool(mx.array_equal(x.view(unsigned), y.view(unsigned)).item())
