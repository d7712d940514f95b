"""The numpy merges (quantized and dense weights): mlx's bits on varied inputs, the fallbacks, and where the fuse uses them."""

from __future__ import annotations

import shutil

import pytest

mx = pytest.importorskip("mlx.core")
np = pytest.importorskip("numpy")

import models as tiny  # noqa: E402
from fuse_support import MIXED_SPEC, fuse_in_memory, read_weights, write_adapters  # noqa: E402

from adapterspec.fuse import merge as merge_paths  # noqa: E402
from adapterspec.fuse import merge_mlx, merge_native, merge_numpy
from adapterspec.fuse.merge import numpy_merges
from adapterspec.fuse.merge_mlx import dequantize_float32, merge, requantize  # noqa: E402
from adapterspec.fuse.plan import Quantization, plan_fuse  # noqa: E402
from adapterspec.fuse.run import fuse_model_dir  # noqa: E402


@pytest.fixture(params=["native", "numpy"])
def merge_path(request, monkeypatch):
    """The compiled kernels (where this machine builds them), or numpy's loops."""
    if request.param == "numpy":
        monkeypatch.setenv(merge_native.NATIVE_ENV, "0")
    elif merge_native.kernels() is None:
        pytest.skip("no C compiler here: the fuse uses numpy's loops")
    return request.param


def quantized_case(rng, rows, cols, rank, bits, group_size, dtype, magnitude, adapter_dtype=np.float16):
    weight = (rng.standard_normal((rows, cols)) * magnitude).astype(dtype)
    parts = [np.asarray(p) for p in mx.quantize(mx.array(weight), group_size=group_size, bits=bits)]
    a = (rng.standard_normal((cols, rank)) * 0.02).astype(adapter_dtype)
    b = (rng.standard_normal((rank, rows)) * 0.02).astype(adapter_dtype)
    return parts, a, b


def mlx_reference(parts, a, b, scale, bits, group_size, dtype):
    """What the mlx path computes: dequantize, merge in float32, round to the scales' dtype, requantize."""
    q = Quantization(group_size, bits, "affine")
    merged = merge(
        "lora",
        dequantize_float32(*map(mx.array, parts), q),
        {"lora_a": mx.array(a), "lora_b": mx.array(b)},
        scale,
        getattr(mx, dtype),
    )
    return [np.asarray(p) for p in requantize(merged, q).values()], np.asarray(merged)


def assert_same_bits(expected, got):
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        assert e.dtype == g.dtype and e.shape == g.shape
        assert np.array_equal(e.view(np.uint8), g.view(np.uint8))


@pytest.mark.parametrize("bits", merge_numpy.BITS)
@pytest.mark.parametrize("dtype", merge_numpy.SCALE_DTYPES)
@pytest.mark.parametrize("rank, group_size", [(1, 32), (3, 64), (8, 64), (16, 128), (64, 32)])
def test_merge_quantized_has_the_bits_of_the_mlx_path(bits, dtype, rank, group_size, merge_path):
    rng = np.random.default_rng(rank * 100 + bits)
    for rows, cols, magnitude, scale in (
        (33, 256, 0.02, 20.0),
        (300, 512, 1.0, 2.0),
        (70, 128, 1e-4, -0.5),
        (5, 128, 300.0, 1e3),
    ):
        for adapter_dtype in (np.float16, np.float32):
            parts, a, b = quantized_case(rng, rows, cols, rank, bits, group_size, dtype, magnitude, adapter_dtype)
            expected, merged = mlx_reference(parts, a, b, scale, bits, group_size, dtype)
            inputs = (*parts, a, b, scale, bits, group_size)
            assert_same_bits(expected, merge_numpy.merge_quantized(*inputs))
            assert_same_bits([merged], merge_numpy.merge_quantized(*inputs, requantize=False))


def test_merge_quantized_at_a_real_size_in_row_chunks(merge_path):
    """A 2048-column weight merged in chunks of rows gives the whole weight's bits (what the workers do)."""
    rng = np.random.default_rng(7)
    parts, a, b = quantized_case(rng, 1000, 2048, 8, 4, 64, "float16", 0.02)
    expected, _ = mlx_reference(parts, a, b, 20.0, 4, 64, "float16")
    prepared = merge_numpy.QuantizedMerge(a, 20.0, 4, 64)
    pieces = [
        prepared.rows(*(p[start : start + 300] for p in parts), b[:, start : start + 300])
        for start in range(0, 1000, 300)
    ]
    assert_same_bits(expected, [np.concatenate(column) for column in zip(*pieces)])


def test_merge_quantized_of_edge_values(merge_path):
    """Zero rows and groups, a zero adapter column, values that round to float16 subnormals, a zero scale."""
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((40, 128)) * 0.02).astype(np.float16)
    weight[1] = 0.0
    weight[2, :64] = 3e-5
    weight[3] = 1e-7
    weight[4, 64:] = -6e-8
    parts = [np.asarray(p) for p in mx.quantize(mx.array(weight), group_size=64, bits=4)]
    a = (rng.standard_normal((128, 8)) * 1e-3).astype(np.float32)
    b = (rng.standard_normal((8, 40)) * 1e-3).astype(np.float32)
    b[:, 5] = 0.0
    for scale in (20.0, 0.0, 1e-8, -3.0):
        expected, merged = mlx_reference(parts, a, b, scale, 4, 64, "float16")
        assert_same_bits(expected, merge_numpy.merge_quantized(*parts, a, b, scale, 4, 64))
        assert_same_bits([merged], merge_numpy.merge_quantized(*parts, a, b, scale, 4, 64, requantize=False))


def test_merge_quantized_refuses_what_it_cannot_round_as_mlx_does(merge_path):
    rng = np.random.default_rng(2)
    parts, a, b = quantized_case(rng, 16, 64, 4, 4, 64, "float16", 0.02)
    with pytest.raises(merge_numpy.Unrepresentable):  # the merged weight overflows float16
        merge_numpy.merge_quantized(*parts, a, b, 1e9, 4, 64)
    scales = parts[1].copy()
    scales[0, 0] = np.inf
    with pytest.raises(merge_numpy.Unrepresentable):
        merge_numpy.merge_quantized(parts[0], scales, parts[2], a, b, 1.0, 4, 64)


@pytest.mark.parametrize("bits", merge_numpy.BITS)
@pytest.mark.parametrize("dtype", merge_numpy.SCALE_DTYPES)
def test_dequantize_and_quantize_have_mlx_bits(bits, dtype):
    rng = np.random.default_rng(bits)
    weight = (rng.standard_normal((50, 256)) * 0.05).astype(dtype)
    weight[0, :32] = 0.0
    parts = mx.quantize(mx.array(weight), group_size=32, bits=bits)
    expected = mx.dequantize(*parts, group_size=32, bits=bits).astype(mx.float32)
    values = merge_numpy.dequantize(*(np.asarray(p) for p in parts), bits, 32)
    assert np.array_equal(np.asarray(expected), values)
    assert_same_bits([np.asarray(p) for p in parts], merge_numpy.quantize(weight.astype(np.float32), bits, 32, dtype))


def test_the_self_check_passes_here():
    assert merge_paths.merge_works()


def test_the_kernels_are_compiled_where_there_is_a_c_compiler():
    if shutil.which("cc") is None and shutil.which("gcc") is None and shutil.which("clang") is None:
        pytest.skip("no C compiler here")
    assert merge_native.kernels() is not None


def test_without_a_compiler_numpy_does_the_work(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    merge_native._load.cache_clear()
    try:
        assert merge_native.kernels() is None
        rng = np.random.default_rng(3)
        parts, a, b = quantized_case(rng, 20, 128, 4, 4, 64, "float16", 0.02)
        expected, _ = mlx_reference(parts, a, b, 2.0, 4, 64, "float16")
        assert_same_bits(expected, merge_numpy.merge_quantized(*parts, a, b, 2.0, 4, 64))
    finally:
        merge_native._load.cache_clear()


def test_kernels_that_differ_from_mlx_are_not_used(monkeypatch):
    """The self-check compares the compiled kernels first; where they differ, numpy's loops take over."""
    monkeypatch.setenv(merge_native.NATIVE_ENV, "1")
    checked = []

    def same_bits():
        checked.append(merge_native.enabled())
        return not merge_native.enabled() or merge_native.kernels() is None

    monkeypatch.setattr(merge_paths, "_same_bits_as_mlx", same_bits)
    assert merge_paths.merge_works.__wrapped__()
    assert not merge_native.enabled()
    assert checked[-1] is False


def test_numpy_merges_plain_lora_on_float16_float32_and_affine_quantized_weights(tmp_path):
    """And on bfloat16 ones where the kernels are compiled."""
    for dtype in ("float16", "float32", "bfloat16"):
        dense = tiny.write(tmp_path / dtype, "llama", dtype=dtype)
        adapters = write_adapters(dense, tmp_path / f"adapters-{dtype}", MIXED_SPEC)
        units = [unit for unit in plan_fuse(dense, adapters).units if unit.adapter]
        chosen = {unit.path: numpy_merges(unit) for unit in units}
        merged_here = dtype != "bfloat16" or merge_native.kernels() is not None  # numpy's loops have no bfloat16
        assert chosen == {unit.path: merged_here and unit.adapter.kind == "lora" for unit in units}
        assert any(chosen.values()) == merged_here
    for mode, bits in (("affine", 4), ("mxfp4", 4)):
        quantized = tiny.write(
            tmp_path / mode, "llama", dtype="float16", quantization={"group_size": 32, "bits": bits, "mode": mode}
        )
        adapters = write_adapters(quantized, tmp_path / f"adapters-{mode}", MIXED_SPEC.replace("**.*norm: full\n", ""))
        units = [unit for unit in plan_fuse(quantized, adapters).units if unit.adapter]
        quantized_lora = {unit.path for unit in units if unit.adapter.kind == "lora" and unit.quantization is not None}
        assert quantized_lora, "the spec must put LoRA on quantized modules"
        for unit in units:
            expected = unit.adapter.kind == "lora" and (unit.quantization is None or mode == "affine")
            assert numpy_merges(unit) == expected, unit.path


@pytest.mark.parametrize("dtype", merge_numpy.DENSE_DTYPES)
@pytest.mark.parametrize("rank", [1, 3, 8, 16, 64])
def test_dense_merge_has_the_bits_of_the_mlx_merge(dtype, rank, merge_path):
    rng = np.random.default_rng(rank)
    for rows, cols, magnitude, scale in (
        (33, 256, 0.02, 20.0),
        (512, 1024, 1.0, 2.0),
        (70, 96, 1e-4, -0.5),
        (1, 64, 300.0, 1e3),
    ):
        for adapter_dtype in (np.float16, np.float32):
            weight = (rng.standard_normal((rows, cols)) * magnitude).astype(dtype)
            a = (rng.standard_normal((cols, rank)) * 0.02).astype(adapter_dtype)
            b = (rng.standard_normal((rank, rows)) * 0.02).astype(adapter_dtype)
            expected = np.asarray(
                merge("lora", mx.array(weight), {"lora_a": mx.array(a), "lora_b": mx.array(b)}, scale)
            )
            assert_same_bits([expected], [merge_numpy.DenseMerge(a, scale).rows(weight, b)])


def test_dense_merge_of_edge_values(merge_path):
    """Float16's largest value, subnormals, zeros, a zero adapter column; scales that overflow and vanish."""
    rng = np.random.default_rng(1)
    weight = np.zeros((40, 128), np.float16)
    weight[1] = 65504.0
    weight[2] = -6e-8
    weight[3] = 1.0
    a = (rng.standard_normal((128, 8)) * 1e-3).astype(np.float32)
    b = (rng.standard_normal((8, 40)) * 1e-3).astype(np.float32)
    b[:, 4] = 0.0
    for scale in (20.0, 0.0, 1e-8, 5e4):
        expected = np.asarray(merge("lora", mx.array(weight), {"lora_a": mx.array(a), "lora_b": mx.array(b)}, scale))
        assert_same_bits([expected], [merge_numpy.DenseMerge(a, scale).rows(weight, b)])


def test_without_the_numpy_merge_the_fuse_is_the_same(tmp_path, monkeypatch):
    quantization = {"group_size": 32, "bits": 4, "mode": "affine"}
    model = tiny.write(tmp_path / "model", "llama", dtype="float16", quantization=quantization)
    adapters = write_adapters(model, tmp_path / "adapters", MIXED_SPEC.replace("**.*norm: full\n", ""))
    for requantization in ("plain", "grid"):
        with_workers = fuse_model_dir(
            model, adapters, tmp_path / f"with-{requantization}", requantization=requantization
        )
        assert len(with_workers.worker_peak_rss) >= 2
    monkeypatch.setattr(merge_paths, "merge_works", lambda: False)
    assert not any(numpy_merges(unit) for unit in plan_fuse(model, adapters).units)
    for requantization in ("plain", "grid"):
        without = fuse_model_dir(model, adapters, tmp_path / f"without-{requantization}", requantization=requantization)
        assert without.worker_peak_rss == []
    reference = fuse_in_memory(model, adapters)
    ours, theirs = read_weights(tmp_path / "with-plain"), read_weights(tmp_path / "without-plain")
    for name, value in reference.items():
        assert mx.array_equal(ours[name], value).item() and mx.array_equal(theirs[name], value).item(), name
    # On the base's grid, the workers and mlx give the same bits too.
    ours, theirs = read_weights(tmp_path / "with-grid"), read_weights(tmp_path / "without-grid")
    assert set(ours) == set(theirs) and all(mx.array_equal(ours[n], theirs[n]).item() for n in ours)


def test_a_module_numpy_cannot_round_falls_back_to_mlx_and_a_non_finite_result_is_refused(tmp_path):
    """An adapter whose merge overflows float16 comes back Unrepresentable from a worker; mlx computes it instead,
    and its infinite scales are an error (only the mlx path checks them, so the error shows it ran): nothing is
    written."""
    from adapterspec.errors import UserError

    quantization = {"group_size": 64, "bits": 4, "mode": "affine"}
    model = tiny.write(tmp_path / "model", "llama", dtype="float16", quantization=quantization)
    spec = "adapterspec 1\n\nlayers[0].self_attn.q_proj: lora(r=4, scale=2.0)\nlayers[1].mlp.up_proj: lora(r=4, scale=2.0)\n"
    adapters = write_adapters(model, tmp_path / "adapters", spec, b_scales={"layers.0.self_attn.q_proj": 1e7})
    assert all(numpy_merges(unit) for unit in plan_fuse(model, adapters).fused_units)
    with pytest.raises(UserError, match="NaN or infinite values in 'model.layers.0.self_attn.q_proj.scales'"):
        fuse_model_dir(model, adapters, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bits", merge_numpy.BITS)
def test_bfloat16_merges_have_the_bits_of_the_mlx_path(bits):
    """bfloat16 weights and bfloat16 scales, as their uint16 bit patterns: the compiled kernels only."""
    if merge_native.kernels() is None:
        pytest.skip("no C compiler here: bfloat16 merges stay with mlx")
    rng = np.random.default_rng(bits)

    def bits_of(array):
        return np.asarray(array.view(mx.uint16) if array.dtype == mx.bfloat16 else array)

    for rank, group_size, magnitude in ((1, 32, 0.02), (8, 64, 1.0), (16, 128, 1e-3)):
        weight = mx.array(rng.standard_normal((70, 256)).astype(np.float32) * magnitude).astype(mx.bfloat16)
        a = (rng.standard_normal((256, rank)) * 0.02).astype(np.float32)
        b = (rng.standard_normal((rank, 70)) * 0.02).astype(np.float32)
        adapter = {"lora_a": mx.array(a), "lora_b": mx.array(b)}
        expected = bits_of(merge("lora", weight, adapter, 20.0))
        assert_same_bits([expected], [merge_numpy.DenseMerge(a, 20.0).rows(bits_of(weight), b, "bfloat16")])
        q = Quantization(group_size, bits, "affine")
        parts = mx.quantize(weight, group_size=group_size, bits=bits)
        merged = merge("lora", dequantize_float32(*parts, q), adapter, 20.0, mx.bfloat16)
        prepared = merge_numpy.QuantizedMerge(a, 20.0, bits, group_size)
        got = prepared.rows(*(bits_of(p) for p in parts), b, True, "bfloat16")
        assert_same_bits([bits_of(p) for p in requantize(merged, q).values()], got)
        assert_same_bits([bits_of(merged)], prepared.rows(*(bits_of(p) for p in parts), b, False, "bfloat16"))


@pytest.mark.parametrize("bits", [8, 4])
def test_on_the_grid_an_unmoved_value_keeps_its_code_where_dividing_back_would_not(bits, merge_path):
    # Values near 1 with a spread far below float16's step there: many codes share a value, and dividing a value
    # back by the scale lands on another code. A zero adapter must still leave every bit as it was.
    rng = np.random.default_rng(7)
    weight = (1.0 + 1e-3 * rng.standard_normal((16, 128))).astype(np.float16)
    parts = mx.quantize(mx.array(weight), group_size=64, bits=bits)
    q = Quantization(64, bits, "affine")
    values = dequantize_float32(*parts, q)
    codes = mx.round((values.reshape(16, 2, 64) - parts[2].astype(mx.float32)[..., None]) / parts[1][..., None])
    assert not mx.array_equal(codes.reshape(16, 128), merge_mlx.unpack_codes(parts[0], bits)).item()
    packed, scales, biases = (np.asarray(p) for p in parts)
    a, b = (rng.standard_normal((128, 4)) * 0.02).astype(np.float32), np.zeros((4, 16), np.float32)
    out = merge_numpy.QuantizedMerge(a, 2.0, bits, 64).rows(packed, scales, biases, b, grid=True)
    assert all(np.array_equal(got, base) for got, base in zip(out, (packed, scales, biases)))
    on_mlx = merge_mlx.on_base_grid(
        values.astype(mx.float16), dict(zip(("weight", "scales", "biases"), mx.quantize(values.astype(mx.float16), 64, bits))),
        dict(zip(("weight", "scales", "biases"), parts)), q,
    )  # fmt: skip
    assert all(mx.array_equal(on_mlx[p], part).item() for p, part in zip(("weight", "scales", "biases"), parts))
