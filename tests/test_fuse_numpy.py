"""The numpy LoRA merge: the bits of the mlx merge on varied inputs, used only where it applies, and the mlx path without it."""

from __future__ import annotations

import pytest

mx = pytest.importorskip("mlx.core")
np = pytest.importorskip("numpy")

import models as tiny  # noqa: E402
from adapterspec import fuse_numpy  # noqa: E402
from adapterspec.fuse import fuse_model_dir  # noqa: E402
from adapterspec.fuse_kernels import merge as mlx_merge  # noqa: E402
from adapterspec.fuse_kernels import numpy_merges  # noqa: E402
from adapterspec.fuse_plan import plan_fuse  # noqa: E402
from test_fuse_support import MIXED_SPEC, fuse_in_memory, read_weights, write_adapters  # noqa: E402


def random_case(rng, rows, cols, rank, dtype, magnitude, adapter_dtype=np.float16):
    weight = (rng.standard_normal((rows, cols)) * magnitude).astype(dtype)
    a = (rng.standard_normal((cols, rank)) * 0.02).astype(adapter_dtype)
    b = (rng.standard_normal((rank, rows)) * 0.02).astype(adapter_dtype)
    return weight, a, b


def assert_same_bits(weight, a, b, scale, dtype):
    expected = mlx_merge("lora", mx.array(weight), {"lora_a": mx.array(a), "lora_b": mx.array(b)}, scale, getattr(mx, dtype))
    got = fuse_numpy.merge(weight, a.astype(np.float32), b.astype(np.float32), scale, dtype)
    assert got.dtype == np.dtype(dtype)
    assert np.array_equal(np.asarray(expected).view(np.uint8), got.view(np.uint8))


# A float32 weight merged into float16 is a dequantized 4-bit or 8-bit one.
@pytest.mark.parametrize("dtype, out", [("float16", "float16"), ("float32", "float32"), ("float32", "float16")])
@pytest.mark.parametrize("rank", [1, 3, 8, 16, 64])
def test_merge_has_the_bits_of_the_mlx_merge(dtype, out, rank):
    rng = np.random.default_rng(rank)
    for rows, cols, magnitude, scale in ((33, 256, 0.02, 20.0), (512, 1024, 1.0, 2.0), (70, 96, 1e-4, -0.5), (1, 64, 300.0, 1e3)):
        for adapter_dtype in (np.float16, np.float32):
            assert_same_bits(*random_case(rng, rows, cols, rank, dtype, magnitude, adapter_dtype), scale, out)


def test_merge_has_the_bits_of_the_mlx_merge_at_a_real_size():
    rng = np.random.default_rng(7)
    weight, a, b = random_case(rng, 2048, 2048, 8, "float16", 0.02)
    assert_same_bits(weight, a, b, 20.0, "float16")
    assert_same_bits(weight.astype(np.float32), a, b, 20.0, "float16")


def test_merge_of_edge_values():
    rng = np.random.default_rng(1)
    weight = np.zeros((40, 128), np.float16)
    weight[1] = 65504.0
    weight[2] = -6e-8
    weight[3] = 1.0
    a = (rng.standard_normal((128, 8)) * 1e-3).astype(np.float32)
    b = (rng.standard_normal((8, 40)) * 1e-3).astype(np.float32)
    b[:, 4] = 0.0
    for scale in (20.0, 0.0, 1e-8, 5e4):
        assert_same_bits(weight, a, b, scale, "float16")
    assert_same_bits(weight, a.astype(np.float16), b.astype(np.float16), 20.0, "float16")


def test_the_self_check_passes_here():
    assert fuse_numpy.merge_works()


def test_numpy_merges_only_plain_lora_on_affine_quantized_weights(tmp_path):
    dense = tiny.write(tmp_path / "dense", "llama", dtype="float16")
    adapters = write_adapters(dense, tmp_path / "adapters", MIXED_SPEC)
    assert not any(numpy_merges(unit) for unit in plan_fuse(dense, adapters).units)
    for mode, bits in (("affine", 4), ("mxfp4", 4)):
        quantized = tiny.write(tmp_path / mode, "llama", dtype="float16", quantization={"group_size": 32, "bits": bits, "mode": mode})
        adapters = write_adapters(quantized, tmp_path / f"adapters-{mode}", MIXED_SPEC.replace("**.*norm: full\n", ""))
        chosen = {unit.path: numpy_merges(unit) for unit in plan_fuse(quantized, adapters).units if unit.adapter}
        kinds = {unit.path: unit.adapter.kind for unit in plan_fuse(quantized, adapters).units if unit.adapter}
        assert chosen == {path: mode == "affine" and kind == "lora" for path, kind in kinds.items()}
        assert any(chosen.values()) == (mode == "affine")


def test_without_the_numpy_merge_the_fuse_is_the_same(tmp_path, monkeypatch):
    quantization = {"group_size": 32, "bits": 4, "mode": "affine"}
    model = tiny.write(tmp_path / "model", "llama", dtype="float16", quantization=quantization)
    adapters = write_adapters(model, tmp_path / "adapters", MIXED_SPEC.replace("**.*norm: full\n", ""))
    fuse_model_dir(model, adapters, tmp_path / "with")
    monkeypatch.setattr(fuse_numpy, "merge_works", lambda: False)
    assert not any(numpy_merges(unit) for unit in plan_fuse(model, adapters).units)
    fuse_model_dir(model, adapters, tmp_path / "without")
    ours, theirs, reference = read_weights(tmp_path / "with"), read_weights(tmp_path / "without"), fuse_in_memory(model, adapters)
    for name, value in reference.items():
        assert mx.array_equal(ours[name], value).item() and mx.array_equal(theirs[name], value).item(), name
