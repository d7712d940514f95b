"""The one merge interface of the fuse: on which device and by which path each unit merges (mlx on the GPU; on
the CPU worker processes in C or numpy, or mlx), and the run-time proof that the workers give the bits of mlx's
CPU path before they are used."""

from __future__ import annotations

import functools

import numpy as np

from ..errors import UserError
from . import merge_native, merge_numpy
from .plan import Quantization, Unit

DEVICES = ("auto", "gpu", "cpu")


def resolve_device(requested: str) -> str:
    """ "gpu" or "cpu": where the merges run. auto takes mlx's GPU (CUDA, Metal) where this mlx has one."""
    import mlx.core as mx

    if requested not in DEVICES:
        raise UserError(f"the fuse device must be one of {', '.join(DEVICES)}, not {requested!r}")
    has_gpu = mx.is_available(mx.gpu)
    if requested == "gpu" and not has_gpu:
        raise UserError(
            "--device gpu: this mlx has no GPU (Metal on a Mac, CUDA with mlx[cuda] on Linux)",
            help="fuse with --device cpu (or auto), or install mlx with GPU support",
        )
    if requested == "auto":
        return "gpu" if has_gpu else "cpu"
    return requested


def merges_on_workers(unit: Unit, device: str) -> bool:
    """Whether the unit merges on worker processes: on the CPU only, where `numpy_merges` says it can."""
    return device == "cpu" and numpy_merges(unit)


@functools.lru_cache(maxsize=None)
def merge_works() -> bool:
    """Whether `merge_numpy.merge_quantized` and `merge_numpy.DenseMerge` give here the bits of mlx's CPU path, on random and edge-case weights.

    The compiled kernels (`merge_native`) are checked first; if they differ, numpy's loops are used instead.
    """
    import mlx.core as mx

    with mx.stream(mx.cpu):
        if merge_native.kernels() is not None and _same_bits_as_mlx():
            return True
        merge_native.disable()
        return _same_bits_as_mlx()


def _same_bits_as_mlx() -> bool:
    import mlx.core as mx

    from .merge_mlx import dequantize_float32, merge, requantize

    def bits_of(array) -> np.ndarray:  # numpy has no bfloat16: its bit patterns
        return np.asarray(array.view(mx.uint16) if array.dtype == mx.bfloat16 else array)

    rng = np.random.default_rng(0)
    for bits in merge_numpy.BITS:
        for dtype in merge_numpy.merge_dtypes():
            for rank, group_size in ((1, 32), (8, 64), (16, 128)):
                q = Quantization(group_size, bits, "affine")
                weight = rng.standard_normal((67, 256)).astype(np.float32) * 0.02
                weight[3] = 0.0
                weight[5, :64] = 1e-6
                parts = mx.quantize(mx.array(weight).astype(getattr(mx, dtype)), group_size=group_size, bits=bits)
                a = (rng.standard_normal((256, rank)) * 0.02).astype(np.float16)
                b = (rng.standard_normal((rank, 67)) * 0.02).astype(np.float16)
                b[:, 7] = 0.0
                adapter = {"lora_a": mx.array(a), "lora_b": mx.array(b)}
                merged = merge("lora", dequantize_float32(*parts, q), adapter, 20.0, getattr(mx, dtype))
                prepared = merge_numpy.QuantizedMerge(a, 20.0, bits, group_size)
                (dense,) = prepared.rows(*(bits_of(p) for p in parts), b, False, dtype)
                pairs = [(bits_of(merged), dense)]
                for grid in (None, dict(zip(("weight", "scales", "biases"), parts))):
                    expected = [bits_of(p) for p in requantize(merged, q, grid).values()]
                    got = prepared.rows(*(bits_of(p) for p in parts), b, True, dtype, grid is not None)
                    pairs += list(zip(expected, got))
                if not all(np.array_equal(e.view(np.uint8), g.view(np.uint8)) for e, g in pairs):
                    return False
    for dtype in merge_numpy.merge_dtypes():
        weight = rng.standard_normal((67, 320)).astype(np.float32) * 0.02
        weight[2, :5] = (0.0, 6e-8, -1e-5, 65504.0, -3e-4)
        weight = mx.array(weight).astype(getattr(mx, dtype))
        a = (rng.standard_normal((320, 8)) * 0.02).astype(np.float16)
        b = (rng.standard_normal((8, 67)) * 0.02).astype(np.float16)
        expected = bits_of(merge("lora", weight, {"lora_a": mx.array(a), "lora_b": mx.array(b)}, 20.0))
        if not np.array_equal(
            expected.view(np.uint8), merge_numpy.DenseMerge(a, 20.0).rows(bits_of(weight), b, dtype).view(np.uint8)
        ):
            return False
    return True


def numpy_merges(unit: Unit) -> bool:
    """Whether the unit merges on worker processes (`merge_numpy`): plain LoRA into a float16/float32 weight or an
    affine-quantized one with float16/float32 scales (bfloat16 too with the compiled kernels), with the bits of
    mlx's CPU path (checked first, by `merge_works`).
    """
    q = unit.quantization
    if unit.adapter is None or unit.adapter.kind != "lora" or unit.stored_quantization is not None or not merge_works():
        return False
    if q is None:
        return unit.dense_dtype in merge_numpy.merge_dtypes()
    return q.mode == "affine" and "biases" in unit.base and merge_numpy.supports(q.bits, q.group_size, unit.dense_dtype)
