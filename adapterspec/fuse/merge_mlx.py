"""The arithmetic of a fuse on mlx arrays: dequantize, merge with `fusemath`, requantize; compiled where it pays.

Every function here gives the bits the adapter layers' own `.fuse()` gives on the CPU (the tests compare
them): compiling only fuses elementwise steps into one loop, the dequantize below rounds where
`mx.dequantize` rounds, and merging a float32 copy of a weight and rounding the sum once is what
`fusemath` does to the weight itself.

On a GPU nothing is compiled (mlx's CUDA backend builds each compiled kernel at run time: 3 s for the
first, 8 s for the fast dequantize, on an H200, where the whole fuse of a 2.4 GB model takes about 2 s),
and the low-rank product is summed term by term, one elementwise operation at a time, as the CPU's
reference BLAS sums it: each product and each sum rounds once in float32 on either device, so the GPU
gives the CPU's bits for plain, switch- and embedding-LoRA (tested on the CPU with the GPU's arithmetic).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, Optional

import mlx.core as mx

from ..adapters import fusemath
from ..model.kinds import DORA_KINDS, EMBEDDING_KINDS, LINEAR_KINDS, SWITCH_KINDS, TOKEN_KINDS

if TYPE_CHECKING:
    from .plan import Quantization, Unit

FAST_DEQUANTIZE_BITS = (2, 4, 8)
FLOAT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
# Veltkamp's split keeps the 11 leading bits of a float32 (float16's precision), rounded to nearest even.
FLOAT16_SPLIT = float(2**13 + 1)
FLOAT16_SMALLEST_NORMAL = 2.0**-14
FLOAT16_OVERFLOW = 65520.0


@functools.lru_cache(maxsize=None)
def compile_works() -> bool:
    """Whether mx.compile can build kernels here (on the CPU it needs a C++ compiler at run time)."""
    try:
        probe = mx.compile(lambda x: (x.astype(mx.float32) * 2 + 1).astype(mx.float16))
        mx.eval(probe(mx.ones((4,), dtype=mx.float16)))
        return True
    except Exception:
        return False


def on_gpu() -> bool:
    """Whether mlx computes on a GPU now (its default device): then nothing is compiled, and products are summed
    term by term."""
    return mx.default_device().type == mx.DeviceType.gpu


def compiled(function: Callable) -> Callable:
    """`function`, compiled at its first call on the CPU where a compiler is there; plain on a GPU."""
    built: list[Callable] = []

    def call(*args):
        if on_gpu() or not compile_works():
            return function(*args)
        if not built:
            built.append(mx.compile(function))
        return built[0](*args)

    return call


def dequantize(weight: mx.array, scales: mx.array, biases: Optional[mx.array], q: Quantization) -> mx.array:
    """The dense weight of a quantized one, equal bit for bit to `mx.dequantize` with the same arguments."""
    if _fast_affine(scales, biases, q):
        return _affine_dequantize(q.group_size, q.bits, False)(weight, scales, biases)
    return mx.dequantize(weight, scales, biases, group_size=q.group_size, bits=q.bits, mode=q.mode)


def dequantize_float32(weight: mx.array, scales: mx.array, biases: Optional[mx.array], q: Quantization) -> mx.array:
    """`dequantize(...)` widened to float32 (the same values), without materialising the narrow copy."""
    if _fast_affine(scales, biases, q):
        return _affine_dequantize(q.group_size, q.bits, True)(weight, scales, biases)
    return dequantize(weight, scales, biases, q).astype(mx.float32)


def _fast_affine(scales: mx.array, biases: Optional[mx.array], q: Quantization) -> bool:
    return q.mode == "affine" and q.bits in FAST_DEQUANTIZE_BITS and scales.dtype in FLOAT_DTYPES and biases is not None


@functools.lru_cache(maxsize=None)
def _affine_dequantize(group_size: int, bits: int, widen: bool) -> Callable:
    per_word = 32 // bits
    shifts = mx.arange(0, 32, bits).astype(mx.uint32)
    mask = (1 << bits) - 1

    def dequantize(weight, scales, biases):
        lead, groups, dtype = weight.shape[:-1], scales.shape[-1], scales.dtype
        codes = (weight.reshape(*lead, groups, group_size // per_word, 1) >> shifts) & mask
        scale = scales.reshape(*lead, groups, 1, 1).astype(mx.float32)
        bias = biases.reshape(*lead, groups, 1, 1).astype(mx.float32)
        # scale·q rounds to the weight dtype before the bias is added, as mx.dequantize rounds.
        value = round_to(round_to(codes.astype(mx.float32) * scale, dtype) + bias, dtype)
        return (value if widen else value.astype(dtype)).reshape(*lead, groups * group_size)

    return compiled(dequantize)


def round_to(x: mx.array, dtype: mx.Dtype) -> mx.array:
    """float32 `x` rounded to `dtype`'s precision and kept in float32: x.astype(dtype).astype(float32)."""
    if dtype == mx.float32:
        return x
    if dtype == mx.float16 and not on_gpu() and float16_split_works():
        return _round_float16(x)
    return x.astype(dtype).astype(mx.float32)


def _round_float16(x: mx.array) -> mx.array:
    split = x * FLOAT16_SPLIT
    normal = split - (split - x)
    subnormal = (x + 0.75) - 0.75  # float16's subnormal spacing 2**-24 is float32's spacing at 0.75
    rounded = mx.where(mx.abs(x) < FLOAT16_SMALLEST_NORMAL, subnormal, normal)
    return mx.where(mx.abs(x) >= FLOAT16_OVERFLOW, x * float("inf"), rounded)


@functools.lru_cache(maxsize=None)
def float16_split_works() -> bool:
    """Whether `_round_float16`, compiled for this device, rounds exactly as a float16 cast does.

    A compiler that contracts or reassociates floating point would break the split; then casts are used.
    """
    finite = mx.arange(0, 0x7C00, dtype=mx.uint32).astype(mx.uint16).view(mx.float16).astype(mx.float32)
    bits = finite.view(mx.uint32)
    ties = (finite[:-1] + finite[1:]) * 0.5
    probe = mx.concatenate([finite, -finite, ties, -ties, (bits + 1).view(mx.float32), (bits[1:] - 1).view(mx.float32),
                            mx.array([65504.0, 65519.0, 65520.0, 1e6, -1e6, float("inf")])])  # fmt: skip
    expected = probe.astype(mx.float16).astype(mx.float32)
    try:
        got = compiled(_round_float16)(probe)
        return bool(mx.array_equal(got, expected).item())
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def _merge(kind: str, scale: float, dtype: mx.Dtype) -> Callable:
    if kind in DORA_KINDS:
        return compiled(lambda w, a, b, m: fusemath.dora_fused_weight(kind, w, a, b, m, scale).astype(dtype))
    return compiled(lambda w, a, b: fusemath.fused_weight(kind, w, a, b, scale).astype(dtype))


def delta_by_terms(kind: str, lora_a: mx.array, lora_b: mx.array, scale: float) -> mx.array:
    """`fusemath.lora_delta` (float32) with the rank-r sum made term after term by elementwise operations."""
    a, b = lora_a.astype(mx.float32), lora_b.astype(mx.float32)
    if kind in LINEAR_KINDS:  # a (in, r), b (r, out) -> (out, in)
        terms = (b[k][:, None] * a[:, k][None, :] for k in range(a.shape[-1]))
    elif kind in SWITCH_KINDS:  # a (E, r, in), b (E, out, r) -> (E, out, in)
        terms = (b[..., k][..., None] * a[:, k][:, None, :] for k in range(a.shape[1]))
    elif kind in EMBEDDING_KINDS:  # a (num, r), b (r, dims) -> (num, dims)
        terms = (a[:, k][:, None] * b[k][None, :] for k in range(a.shape[-1]))
    else:
        raise ValueError(f"unknown adapter kind {kind!r}")
    delta = next(terms)
    for term in terms:
        delta = delta + term
    return scale * delta


def _merge_by_terms(kind: str, weight: mx.array, adapter: dict[str, mx.array], scale: float, dtype: mx.Dtype):
    adapted = weight.astype(mx.float32) + delta_by_terms(kind, adapter["lora_a"], adapter["lora_b"], scale)
    if kind in DORA_KINDS:
        adapted = (adapter["m"].astype(mx.float32) / fusemath.row_norms(adapted))[..., None] * adapted
    return adapted.astype(weight.dtype).astype(dtype)


def token_slots(unit: Unit) -> mx.array:
    """Per row of a tokens unit's embedding: the position of its trained values in `token_rows`, or −1."""
    slots = [-1] * unit.logical_shape[0]
    for slot, row in enumerate(unit.adapter.rows):
        slots[row] = slot
    return mx.array(slots, dtype=mx.int32)


def merge(
    kind: str, weight: mx.array, adapter: dict[str, mx.array], scale: float, dtype: Optional[mx.Dtype] = None
) -> mx.array:
    """W + ΔW (DoRA: renormalised) through `fusemath`, rounded once to `dtype` (default: the weight's); for token
    rows, the rows written (`adapter["slots"]` says which row of `weight` takes which trained row)."""
    if kind in TOKEN_KINDS:
        slots = adapter["slots"]
        written = adapter["token_rows"][mx.maximum(slots, 0)].astype(dtype or weight.dtype)
        return mx.where((slots >= 0)[:, None], written, weight.astype(dtype or weight.dtype))
    if on_gpu():
        return _merge_by_terms(kind, weight, adapter, float(scale), dtype or weight.dtype)
    args = (weight, adapter["lora_a"], adapter["lora_b"]) + ((adapter["m"],) if kind in DORA_KINDS else ())
    return _merge(kind, float(scale), dtype or weight.dtype)(*args)


def requantize(weight: mx.array, q: Quantization, base: Optional[dict[str, mx.array]] = None) -> dict[str, mx.array]:
    """weight, scales (and biases for affine) of `weight` quantized like the base, as mlx's layers quantize.

    With `base` (the input's quantized tensors of the same rows), groups stay on the base's own grid where they
    can (`on_base_grid`).
    """
    parts = dict(
        zip(("weight", "scales", "biases"), mx.quantize(weight, group_size=q.group_size, bits=q.bits, mode=q.mode))
    )
    return parts if base is None else on_base_grid(weight, parts, base, q)


def on_base_grid(weight: mx.array, fresh: dict[str, mx.array], base: dict[str, mx.array], q: Quantization) -> dict:
    """Requantization that changes only what the merge changed, group by group (a group is whole packed words).

    Affine: a group whose every merged value rounds to a code of the base's grid (its scale and bias) is stored on
    it, with the base's scale and bias: the nearest representable group, and the base's own bits wherever no code
    moved; the rest keep `fresh` (mx.quantize's). Other modes, whose scale follows the group's largest magnitude:
    a group whose values dequantize as the base's keeps the base's bits.
    """
    lead, groups = weight.shape[:-1], base["scales"].shape[-1]
    words = base["weight"].shape[-1] // groups

    def by_group(x: mx.array, width: int) -> mx.array:
        return x.reshape(*lead, groups, width)

    if q.mode == "affine" and "biases" in base:
        scales, biases = (base[p].astype(mx.float32)[..., None] for p in ("scales", "biases"))
        merged = by_group(weight.astype(mx.float32), q.group_size)
        codes = mx.round((merged - biases) / scales)
        # A value the adapter did not move keeps its own code (at 8 bits a bfloat16 value can round far enough
        # that dividing back gives its neighbour's).
        unmoved = merged == by_group(
            dequantize_float32(base["weight"], base["scales"], base["biases"], q), q.group_size
        )
        codes = mx.where(unmoved, by_group(unpack_codes(base["weight"], q.bits), q.group_size), codes)
        top = (1 << q.bits) - 1
        fits = mx.all((codes >= 0) & (codes <= top), axis=-1)
        packed = pack_codes(mx.clip(codes, 0, top).astype(mx.uint32).reshape(*lead, -1), q.bits)
    else:

        def values(parts):
            return by_group(dequantize(parts["weight"], parts["scales"], parts.get("biases"), q), q.group_size)

        fits = mx.all(values(fresh) == values(base), axis=-1)
        packed = base["weight"]
    out = {"weight": mx.where(fits[..., None], by_group(packed, words), by_group(fresh["weight"], words))}
    out["weight"] = out["weight"].reshape(fresh["weight"].shape)
    for param in ("scales", "biases"):
        if param in fresh:
            out[param] = mx.where(fits, base[param], fresh[param])
    return out


def unpack_codes(packed: mx.array, bits: int) -> mx.array:
    """The float32 codes (..., words·32/bits) of mlx's packed uint32 words (`pack_codes` undone)."""
    lead, words = packed.shape[:-1], packed.shape[-1]
    stream = (packed[..., None] >> mx.arange(32, dtype=mx.uint32)) & 1
    stream = stream.reshape(*lead, words * 32 // bits, bits)
    return mx.sum(stream << mx.arange(bits, dtype=mx.uint32), axis=-1).astype(mx.float32)


def pack_codes(codes: mx.array, bits: int) -> mx.array:
    """uint32 codes (..., n) packed as mlx packs them: a little-endian stream of `bits`-bit fields in uint32 words."""
    lead, n = codes.shape[:-1], codes.shape[-1]
    stream = (codes[..., None] >> mx.arange(bits, dtype=mx.uint32)) & 1
    stream = stream.reshape(*lead, n * bits // 32, 32)
    return mx.sum(stream << mx.arange(32, dtype=mx.uint32), axis=-1).astype(mx.uint32)


def adapter_rows(kind: str, adapter: dict[str, mx.array], index) -> dict[str, mx.array]:
    """The adapter tensors that merge into `index` (a slice or indices) along the weight's first axis."""
    if kind in TOKEN_KINDS:
        return {"token_rows": adapter["token_rows"], "slots": adapter["slots"][index]}
    a, b = adapter["lora_a"], adapter["lora_b"]
    if kind in SWITCH_KINDS:  # the first axis is the experts': each expert's own A, B (and m)
        rows = {"lora_a": a[index], "lora_b": b[index]}
    elif kind in EMBEDDING_KINDS:
        rows = {"lora_a": a[index], "lora_b": b}
    else:
        rows = {"lora_a": a, "lora_b": b[:, index]}
    if "m" in adapter:
        rows["m"] = adapter["m"][index]
    return rows


def outputs(unit: Unit, weight: mx.array, base: Optional[dict[str, mx.array]] = None) -> dict[str, mx.array]:
    """The output tensors of a unit from its merged dense weight (requantized when the unit is: on the grid of
    `base`, the unit's input tensors of the same rows, when the unit asks for it)."""
    q = unit.output_quantization
    if q is not None:
        grid = base if unit.requantization == "grid" and unit.stored_quantization is None else None
        return {f"{unit.path}.{param}": value for param, value in requantize(weight, q, grid).items()}
    return {f"{unit.path}.weight": weight}


def compute_chunk(
    unit: Unit, base: dict[str, mx.array], adapters: dict[str, mx.array], rows: Optional[tuple[int, int]] = None
) -> dict[str, mx.array]:
    """The output tensors of a unit (lazy), or of rows[0]:rows[1] along their first axis when `rows` is given."""
    q = unit.quantization
    weight = base["weight"]
    if q is not None:
        widen = dequantize_float32 if unit.adapter is not None else dequantize
        weight = widen(base["weight"], base["scales"], base.get("biases"), q)
    if unit.adapter is not None:
        adapter = unit_adapter(unit, adapters, rows)
        weight = merge(unit.adapter.kind, weight, adapter, unit.adapter.scale, getattr(mx, unit.dense_dtype))
    return outputs(unit, weight, base)


def unit_adapter(unit: Unit, adapters: dict[str, mx.array], rows: Optional[tuple[int, int]]) -> dict[str, mx.array]:
    """The adapter tensors of a unit that merge into `rows` (all of them when None)."""
    adapter = {param: adapters[source.name] for param, source in unit.adapter_tensors.items()}
    if unit.adapter.kind in TOKEN_KINDS:
        adapter["slots"] = token_slots(unit)
    if rows is not None:
        adapter = adapter_rows(unit.adapter.kind, adapter, slice(*rows))
    return adapter
