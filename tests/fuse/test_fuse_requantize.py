"""Requantization: every MLX quantization mode fuses as mlx-lm's layers do (plain), and on the base's own grid
a group the adapter does not move keeps its bits while a moved one is the nearest point of that grid."""

from __future__ import annotations

import json

import pytest

mx = pytest.importorskip("mlx.core")

import models as tiny  # noqa: E402
from fuse_support import MLX_LM_SPEC, fuse_in_memory, fuse_with_mlx_lm, read_weights, write_adapters  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from adapterspec.fuse.run import fuse_model_dir  # noqa: E402

# Every mode MLX quantizes in: affine at each bit width (group sizes 32, 64 and 128 spread over them), and the
# floating-point block formats at their fixed group sizes.
MODES = {
    "affine2-g32": {"group_size": 32, "bits": 2, "mode": "affine"},
    "affine3-g64": {"group_size": 64, "bits": 3, "mode": "affine"},
    "affine4-g128": {"group_size": 128, "bits": 4, "mode": "affine"},
    "affine5-g32": {"group_size": 32, "bits": 5, "mode": "affine"},
    "affine6-g64": {"group_size": 64, "bits": 6, "mode": "affine"},
    "affine8-g128": {"group_size": 128, "bits": 8, "mode": "affine"},
    "affine4-g64": {"group_size": 64, "bits": 4, "mode": "affine"},
    "mxfp4": {"group_size": 32, "bits": 4, "mode": "mxfp4"},
    "nvfp4": {"group_size": 16, "bits": 4, "mode": "nvfp4"},
    "mxfp8": {"group_size": 32, "bits": 8, "mode": "mxfp8"},
}
# 128 columns in every linear, so that a group of 128 fits.
WIDE = {"hidden_size": 128, "intermediate_size": 256}


def write_model(path, quantization):
    try:
        return tiny.write(path, "llama", dtype="float16", quantization=quantization, **WIDE)
    except (ValueError, RuntimeError) as error:  # a mode this MLX build cannot quantize on this machine
        pytest.skip(f"MLX cannot quantize {quantization} here: {error}")


def assert_same(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype and ours[name].shape == value.shape, name
        assert mx.array_equal(ours[name], value).item(), f"{name} differs"


def dequantized(weights: dict, owner: str, quantization: dict) -> mx.array:
    if f"{owner}.scales" not in weights:
        return weights[f"{owner}.weight"].astype(mx.float32)
    return mx.dequantize(
        weights[f"{owner}.weight"], weights[f"{owner}.scales"], weights.get(f"{owner}.biases"),
        group_size=quantization["group_size"], bits=quantization["bits"], mode=quantization["mode"],
    ).astype(mx.float32)  # fmt: skip


def assert_close_to_mlx_lm(ours: dict, theirs: dict, quantization: dict) -> None:
    """mlx-lm's layers round ΔW to the weight's dtype before adding it, where the adapters' own `.fuse()` rounds the
    sum once: so the requantized weights may differ by about a step (a refitted scale), in few elements."""
    assert set(ours) == set(theirs)
    for name in theirs:
        owner, _, param = name.rpartition(".")
        if param != "weight":
            continue
        a, b = dequantized(ours, owner, quantization), dequantized(theirs, owner, quantization)
        # The widest step: an affine group's range over its codes; a float format's step at its largest values
        # (e2m1: 4 → 6 of 6; e4m3: 416 → 448 of 448).
        top = mx.abs(b).max().item()
        if quantization["mode"] == "affine":
            step = 2 * top / (2 ** quantization["bits"] - 1)
        else:
            step = top / 3 if quantization["bits"] == 4 else top / 14
        assert mx.abs(a - b).max().item() <= 1.5 * step, name
        assert mx.abs(a - b).mean().item() <= 0.1 * step, name


@pytest.mark.parametrize("name", list(MODES))
def test_every_mode_fuses_as_mlx_lm_and_zero_adapters_change_no_bit(name, tmp_path):
    quantization = MODES[name]
    model = write_model(tmp_path / "model", quantization)
    adapters = write_adapters(model, tmp_path / "adapters", MLX_LM_SPEC)
    fuse_model_dir(model, adapters, tmp_path / "plain", requantization="plain")
    ours = read_weights(tmp_path / "plain")
    assert_same(ours, fuse_in_memory(model, adapters))
    assert_close_to_mlx_lm(ours, fuse_with_mlx_lm(model, adapters), quantization)
    fuse_model_dir(model, adapters, tmp_path / "dense", dequantize=True)
    ours = read_weights(tmp_path / "dense")
    assert_same(ours, fuse_in_memory(model, adapters, dequantize=True))
    theirs = fuse_with_mlx_lm(model, adapters, dequantize=True)
    assert set(ours) == set(theirs)
    assert all(mx.allclose(ours[k], theirs[k], atol=2e-3, rtol=2e-3).item() for k in theirs)

    inputs = read_weights_of(model)
    untrained = write_adapters(model, tmp_path / "untrained", MLX_LM_SPEC, b_scale=0.0)
    fuse_model_dir(model, untrained, tmp_path / "zero")
    assert_same(read_weights(tmp_path / "zero"), inputs)


def read_weights_of(model_dir) -> dict:
    weights = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        weights.update(mx.load(str(file)))
    return weights


def test_plain_requantization_of_zero_adapters_rewrites_tensors_the_grid_does_not(tmp_path):
    """The issue's finding, kept as a fact of mlx-lm's requantization: it is not idempotent."""
    model = write_model(tmp_path / "model", MODES["affine4-g64"])
    untrained = write_adapters(model, tmp_path / "untrained", MLX_LM_SPEC, b_scale=0.0)
    fuse_model_dir(model, untrained, tmp_path / "plain", requantization="plain")
    inputs, plain = read_weights_of(model), read_weights(tmp_path / "plain")
    assert_same(plain, fuse_with_mlx_lm(model, untrained))
    assert any(not mx.array_equal(plain[n], inputs[n]).item() for n in inputs)


@pytest.mark.parametrize("bits", [4, 3])
def test_a_moved_group_is_the_nearest_point_of_the_base_grid_and_an_unmoved_one_keeps_its_bits(tmp_path, bits):
    """Checked group by group against the layers' own dense fuse: on the grid (the base's scale and bias kept) the
    codes are the nearest ones to W + ΔW, an untouched row (B's column zero) is bit-identical, and a group that does
    not fit the grid is mlx-lm's requantization of it. 4 bits merge on the worker processes, 3 bits in mlx."""
    quantization = {"group_size": 32, "bits": bits, "mode": "affine"}
    model = write_model(tmp_path / "model", quantization)
    adapters = write_adapters(model, tmp_path / "adapters", MLX_LM_SPEC, b_scale=0.02)
    path = "model.layers.3.self_attn.q_proj"
    # One untouched row: zero that row's column of B.
    weights = dict(tree_flatten(mx.load(str(adapters / "adapters.safetensors"))))
    b = weights[f"{path}.lora_b"]
    b[:, 5] = 0.0
    weights[f"{path}.lora_b"] = b
    mx.save_safetensors(str(adapters / "adapters.safetensors"), weights)

    fuse_model_dir(model, adapters, tmp_path / "grid")
    ours, inputs = read_weights(tmp_path / "grid"), read_weights_of(model)
    plain = fuse_in_memory(model, adapters)
    merged = fuse_in_memory(model, adapters, dense_paths={path})[f"{path}.weight"].astype(mx.float32)
    top = 2**bits - 1
    on_grid = moved = 0
    for row in range(merged.shape[0]):
        for group in range(merged.shape[1] // 32):
            s, bias = (inputs[f"{path}.{p}"][row, group].astype(mx.float32).item() for p in ("scales", "biases"))
            values = merged[row, group * 32 : (group + 1) * 32]
            nearest = mx.round((values - bias) / s)
            ours_group = unpack(ours[f"{path}.weight"][row], bits)[group * 32 : (group + 1) * 32]
            input_group = unpack(inputs[f"{path}.weight"][row], bits)[group * 32 : (group + 1) * 32]
            if mx.all((nearest >= 0) & (nearest <= top)).item():
                on_grid += 1
                moved += int(not mx.array_equal(ours_group, input_group).item())
                assert mx.array_equal(ours_group, nearest.astype(mx.uint32)).item(), (row, group)
                for p in ("scales", "biases"):
                    assert ours[f"{path}.{p}"][row, group].item() == inputs[f"{path}.{p}"][row, group].item()
            else:
                assert mx.array_equal(
                    ours_group, unpack(plain[f"{path}.weight"][row], bits)[group * 32 : (group + 1) * 32]
                ).item()
                assert ours[f"{path}.scales"][row, group].item() == plain[f"{path}.scales"][row, group].item()
    assert on_grid > 0 and moved > 0
    for p in ("weight", "scales", "biases"):
        assert mx.array_equal(ours[f"{path}.{p}"][5], inputs[f"{path}.{p}"][5]).item()


def unpack(words: mx.array, bits: int) -> mx.array:
    """The codes of one row of packed words (mlx's little-endian stream of `bits`-bit fields)."""
    stream = (words[:, None] >> mx.arange(32, dtype=mx.uint32)) & 1
    fields = stream.reshape(-1, bits)
    return mx.sum(fields << mx.arange(bits, dtype=mx.uint32), axis=-1)


def test_grid_requantization_is_recorded_nowhere_and_loads_as_the_base_does(tmp_path):
    """The fused config is the base's (no per-module entries): grid requantization stores the same format."""
    model = write_model(tmp_path / "model", MODES["affine4-g64"])
    adapters = write_adapters(model, tmp_path / "adapters", MLX_LM_SPEC)
    fuse_model_dir(model, adapters, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization"] == json.loads((model / "config.json").read_text())["quantization"]


@pytest.mark.parametrize("arithmetic", ["cpu", "gpu"])
@pytest.mark.parametrize("bits", [8, 4])
def test_zero_adapters_change_no_bit_with_bfloat16_scales(tmp_path, monkeypatch, bits, arithmetic):
    # At 8 bits, bfloat16's 8-bit significand rounds some codes' values (code·scale + bias) so far that dividing
    # back lands on the neighbouring code: a value the adapter does not move must keep its own code.
    quantization = {"group_size": 64, "bits": bits, "mode": "affine"}
    model = tiny.write(tmp_path / "model", "llama", dtype="bfloat16", quantization=quantization, **WIDE)
    untrained = write_adapters(model, tmp_path / "untrained", MLX_LM_SPEC, b_scale=0.0)
    if arithmetic == "gpu":  # the GPU path's arithmetic (mlx operations, no worker processes), on this device
        import adapterspec.fuse.merge_mlx as merge_mlx

        available = mx.is_available
        monkeypatch.setattr(mx, "is_available", lambda device: True if device == mx.gpu else available(device))
        monkeypatch.setattr(merge_mlx, "on_gpu", lambda: True)
    fuse_model_dir(model, untrained, tmp_path / "zero", device="gpu" if arithmetic == "gpu" else "cpu")
    assert_same(read_weights(tmp_path / "zero"), read_weights_of(model))
