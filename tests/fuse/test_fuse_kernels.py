"""The fused CUDA kernels of the GPU fuse give the bits of the mlx operations they replace: the merge of LoRA into
dense and affine-quantized weights (ranks, scales, dtypes, odd widths, overflow), the requantization on the base's
grid, and whole fuses with the kernels on and off. They run only where mlx has a CUDA GPU."""

from __future__ import annotations

import pytest

mx = pytest.importorskip("mlx.core")

if not (mx.is_available(mx.gpu) and mx.cuda.is_available()):
    pytest.skip("the fuse's kernels are CUDA kernels: this mlx has no CUDA GPU", allow_module_level=True)

import models as tiny  # noqa: E402
from fuse_support import MLX_LM_SPEC, read_weights, write_adapters  # noqa: E402

from adapterspec.fuse import merge_cuda, merge_mlx  # noqa: E402
from adapterspec.fuse.plan import Quantization  # noqa: E402
from adapterspec.fuse.run import fuse_model_dir  # noqa: E402

bits_equal = merge_cuda.same_bits


def operations_merge(weight, a, b, scale, dtype, quantized=None):
    if quantized is not None:
        scales, biases, q = quantized
        weight = merge_mlx.dequantize_float32(weight, scales, biases, q)
    return merge_mlx.merge("lora", weight, {"lora_a": a, "lora_b": b}, scale, dtype)


@pytest.mark.parametrize("weight_dtype", [mx.float16, mx.bfloat16, mx.float32])
@pytest.mark.parametrize("rank,cols,scale", [(1, 64, 1.0), (8, 200, 20.0), (16, 1000, 0.37)])
def test_the_dense_merge_kernel_gives_the_operations_bits(weight_dtype, rank, cols, scale):
    key = iter(mx.random.split(mx.random.key(3), 4))
    weight = (mx.random.normal((37, cols), key=next(key)) * 0.02).astype(weight_dtype)
    a = mx.random.normal((cols, rank), key=next(key)) * 0.1
    b = (mx.random.normal((rank, 37), key=next(key)) * 0.05).astype(mx.bfloat16)
    for dtype in {weight_dtype, mx.float32}:
        got = merge_cuda.merge(weight, a, b, scale, dtype)
        assert bits_equal(got, operations_merge(weight, a, b, scale, dtype)), dtype


def test_a_merge_that_overflows_float16_gives_infinities_as_the_operations_do():
    weight = mx.full((4, 64), 60000.0, dtype=mx.float16)
    a, b = mx.ones((64, 2)) * 100.0, mx.ones((2, 4)) * 100.0
    got = merge_cuda.merge(weight, a, b, 1.0, mx.float16)
    assert bits_equal(got, operations_merge(weight, a, b, 1.0, mx.float16))
    assert not mx.all(mx.isfinite(got)).item()


@pytest.mark.parametrize("bits,group_size", [(2, 128), (4, 32), (4, 64), (8, 64)])
@pytest.mark.parametrize("scales_dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("b_scale", [0.0, 1e-4, 0.05])
def test_the_quantized_merge_and_the_grid_kernel_give_the_operations_bits(bits, group_size, scales_dtype, b_scale):
    key = iter(mx.random.split(mx.random.key(bits * 1000 + group_size), 4))
    q = Quantization(group_size, bits, "affine")
    rows, cols, rank = 48, 4 * group_size, 8
    dense = (mx.random.normal((rows, cols), key=next(key)) * 0.02).astype(scales_dtype)
    packed, scales, biases = mx.quantize(dense, group_size=group_size, bits=bits)
    a = mx.random.normal((cols, rank), key=next(key)) * 0.1
    b = mx.random.normal((rank, rows), key=next(key)) * b_scale
    quantized = (scales, biases, q)
    merged = merge_cuda.merge(packed, a, b, 2.0, scales_dtype, quantized)
    reference = operations_merge(packed, a, b, 2.0, scales_dtype, quantized)
    assert bits_equal(merged, reference)
    base = {"weight": packed, "scales": scales, "biases": biases}
    assert merge_cuda.requantizes_on_grid(merged, q, base)
    got = merge_cuda.requantize_on_grid(merged, q, base)
    fresh = dict(zip(("weight", "scales", "biases"), mx.quantize(merged, group_size=group_size, bits=bits)))
    expected = merge_mlx.on_base_grid(merged, fresh, base, q)
    for param in ("weight", "scales", "biases"):
        assert bits_equal(got[param], expected[param]), param
    if b_scale == 0.0:  # nothing moved: the base's own bits
        assert all(bits_equal(got[p], base[p]) for p in ("weight", "scales", "biases"))


@pytest.mark.parametrize(
    "weight_dtype,rank,dtype,q,scales_dtype",
    [
        (mx.float16, 8, mx.float16, None, None),
        (mx.bfloat16, 16, mx.float32, None, None),
        (mx.uint32, 8, mx.float16, Quantization(64, 4, "affine"), mx.float16),
        (mx.uint32, 4, mx.bfloat16, Quantization(32, 8, "affine"), mx.bfloat16),
    ],
)
def test_the_kernels_pass_their_own_check_before_first_use(weight_dtype, rank, dtype, q, scales_dtype):
    assert merge_cuda.merge_agrees(weight_dtype, rank, dtype, q, scales_dtype)
    if q is not None:
        assert merge_cuda.grid_agrees(q, dtype)


QUANTIZED = {
    "4bit-g32": {"group_size": 32, "bits": 4, "mode": "affine"},
    "8bit-g64": {"group_size": 64, "bits": 8, "mode": "affine"},
    "2bit-g64": {"group_size": 64, "bits": 2, "mode": "affine"},
}


@pytest.mark.parametrize("name", ["float16", "bfloat16", *QUANTIZED])
@pytest.mark.parametrize("requantization", ["grid", "plain"])
def test_a_fuse_with_the_kernels_gives_the_files_of_one_without(tmp_path, monkeypatch, name, requantization):
    if name in ("float16", "bfloat16") and requantization == "plain":
        pytest.skip("a dense model is never requantized")
    quantization = QUANTIZED.get(name)
    dtype = name if quantization is None else "float16"
    model = tiny.write(tmp_path / "model", "llama", dtype=dtype, quantization=quantization)
    adapters = write_adapters(model, tmp_path / "adapters", MLX_LM_SPEC)
    calls = {"merge": 0, "grid": 0}
    merge, grid = merge_cuda.merge, merge_cuda.requantize_on_grid
    monkeypatch.setattr(merge_cuda, "merge", lambda *a: calls.__setitem__("merge", calls["merge"] + 1) or merge(*a))
    monkeypatch.setattr(
        merge_cuda, "requantize_on_grid", lambda *a: calls.__setitem__("grid", calls["grid"] + 1) or grid(*a)
    )
    fuse_model_dir(model, adapters, tmp_path / "kernels", device="gpu", requantization=requantization)
    assert calls["merge"] > 0, "the merge kernel ran"
    assert (calls["grid"] > 0) == (quantization is not None and requantization == "grid")
    monkeypatch.setenv("ADAPTERSPEC_FUSE_KERNELS", "0")
    before = dict(calls)
    fuse_model_dir(model, adapters, tmp_path / "operations", device="gpu", requantization=requantization)
    assert calls == before, "with ADAPTERSPEC_FUSE_KERNELS=0 no kernel runs"
    with_kernels, with_operations = read_weights(tmp_path / "kernels"), read_weights(tmp_path / "operations")
    assert set(with_kernels) == set(with_operations)
    for key, value in with_operations.items():
        assert bits_equal(with_kernels[key], value), key
