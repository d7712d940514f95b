"""Streaming fuse: equal to the in-memory fuse and to mlx-lm's, sharded like mlx-lm, loadable, with the right config."""

from __future__ import annotations

import json

import pytest

mx = pytest.importorskip("mlx.core")

import models as tiny  # noqa: E402
from fuse_support import (  # noqa: E402
    MIXED_SPEC,
    MLX_LM_SPEC,
    MOE_SPEC,
    fuse_in_memory,
    fuse_with_mlx_lm,
    read_weights,
    tree_hash,
    write_adapters,
)

from adapterspec.fuse.plan import plan_fuse  # noqa: E402
from adapterspec.fuse.run import fuse_model_dir  # noqa: E402

QUANTIZATIONS = {
    "4bit": {"group_size": 32, "bits": 4, "mode": "affine"},
    "8bit": {"group_size": 32, "bits": 8, "mode": "affine"},
    "mxfp4": {"group_size": 32, "bits": 4, "mode": "mxfp4"},
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Tiny llamas: dense float16 / bfloat16 / float32, float16 quantized three ways, bfloat16 in 4 bits."""
    root = tmp_path_factory.mktemp("models")
    dirs = {dtype: tiny.write(root / dtype, "llama", dtype=dtype) for dtype in ("float16", "bfloat16", "float32")}
    for name, quantization in QUANTIZATIONS.items():
        dirs[name] = tiny.write(root / name, "llama", dtype="float16", quantization=quantization)
    dirs["4bit-bfloat16"] = tiny.write(
        root / "4bit-bfloat16", "llama", dtype="bfloat16", quantization=QUANTIZATIONS["4bit"]
    )
    return dirs


def assert_equal(ours: dict, reference: dict) -> None:
    assert set(ours) == set(reference)
    for name, value in reference.items():
        assert ours[name].dtype == value.dtype, name
        assert ours[name].shape == value.shape, name
        assert mx.array_equal(ours[name], value).item(), f"{name} differs"


def dense(weights: dict, path: str, bits: int, group_size: int, mode: str) -> mx.array:
    if f"{path}.scales" not in weights:
        return weights[f"{path}.weight"].astype(mx.float32)
    return mx.dequantize(weights[f"{path}.weight"], weights[f"{path}.scales"], weights.get(f"{path}.biases"),
                         group_size=group_size, bits=bits, mode=mode).astype(mx.float32)  # fmt: skip


def assert_close_quantized(ours: dict, reference: dict, quantization: dict) -> None:
    """Equal up to requantization: any element off by at most about one quantization step, and rarely."""
    assert set(ours) == set(reference)
    for name in reference:
        owner, _, param = name.rpartition(".")
        if param in ("scales", "biases"):
            continue
        if param == "weight" and f"{owner}.scales" in reference:
            a, b = dense(ours, owner, **quantization), dense(reference, owner, **quantization)
            step = mx.abs(b).max().item() / (2 ** (quantization["bits"] - 1))
            assert mx.abs(a - b).max().item() <= step, name
            assert mx.abs(a - b).mean().item() <= 0.1 * step, name
        else:
            assert mx.allclose(
                ours[name].astype(mx.float32), reference[name].astype(mx.float32), atol=1e-3, rtol=1e-2
            ).item(), name


# ── equal to the in-memory fuse ─────────────────────────────────────────────


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("embedding", ["lora", "dora"])
def test_dense_fuse_equals_in_memory_fuse_bit_for_bit(model_dirs, tmp_path, dtype, embedding):
    spec = MIXED_SPEC.replace("embed_tokens: lora(r=4)", f"embed_tokens: {embedding}(r=4)")
    adapters = write_adapters(model_dirs[dtype], tmp_path / "adapters", spec)
    fuse_model_dir(model_dirs[dtype], adapters, tmp_path / "out")
    assert_equal(read_weights(tmp_path / "out"), fuse_in_memory(model_dirs[dtype], adapters))


@pytest.mark.parametrize("name", [*QUANTIZATIONS, "4bit-bfloat16"])
def test_quantized_fuse_equals_in_memory_fuse(model_dirs, tmp_path, name):
    adapters = write_adapters(model_dirs[name], tmp_path / "adapters", MIXED_SPEC.replace("**.*norm: full\n", ""))
    fuse_model_dir(model_dirs[name], adapters, tmp_path / "out", requantization="plain")
    ours, reference = read_weights(tmp_path / "out"), fuse_in_memory(model_dirs[name], adapters)
    assert_close_quantized(ours, reference, QUANTIZATIONS[name.split("-")[0]])
    # In fact the streaming arithmetic is the same as the layers' own, so the files are identical.
    assert_equal(ours, reference)


def test_quantized_fuse_with_dequantize_equals_in_memory_fuse(model_dirs, tmp_path):
    adapters = write_adapters(model_dirs["4bit"], tmp_path / "adapters", MIXED_SPEC.replace("**.*norm: full\n", ""))
    fuse_model_dir(model_dirs["4bit"], adapters, tmp_path / "out", dequantize=True)
    assert_equal(read_weights(tmp_path / "out"), fuse_in_memory(model_dirs["4bit"], adapters, dequantize=True))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config


@pytest.mark.parametrize("quantization", [None, QUANTIZATIONS["4bit"]], ids=["float32", "4bit"])
def test_switch_experts_fuse_equals_in_memory_fuse(tmp_path, quantization):
    model_dir = tiny.write(tmp_path / "moe", "mixtral", quantization=quantization)
    adapters = write_adapters(model_dir, tmp_path / "adapters", MOE_SPEC)
    fuse_model_dir(model_dir, adapters, tmp_path / "out", requantization="plain")
    assert_equal(read_weights(tmp_path / "out"), fuse_in_memory(model_dir, adapters))


def test_chunked_merge_equals_whole_merge(model_dirs, tmp_path, monkeypatch):
    import adapterspec.fuse.stream as stream

    adapters = write_adapters(model_dirs["4bit"], tmp_path / "adapters", MIXED_SPEC.replace("**.*norm: full\n", ""))
    monkeypatch.setattr(stream, "CHUNK_BYTES", 40_000)
    monkeypatch.setattr(stream, "IN_FLIGHT_BYTES", 100_000)
    chunk_counts = []
    chunks_of = stream.chunks_of
    monkeypatch.setattr(
        stream, "chunks_of", lambda unit, size: chunk_counts.append(len(chunks_of(unit, size))) or chunks_of(unit, size)
    )
    fuse_model_dir(model_dirs["4bit"], adapters, tmp_path / "out", requantization="plain")
    assert max(chunk_counts) > 4
    assert_equal(read_weights(tmp_path / "out"), fuse_in_memory(model_dirs["4bit"], adapters))


# ── equal to mlx-lm's fuse ──────────────────────────────────────────────────


@pytest.mark.parametrize("name", ["float16", "4bit"])
def test_fuse_matches_mlx_lm_fuse(model_dirs, tmp_path, name):
    adapters = write_adapters(model_dirs[name], tmp_path / "adapters", MLX_LM_SPEC)
    fuse_model_dir(model_dirs[name], adapters, tmp_path / "out", requantization="plain")
    ours, theirs = read_weights(tmp_path / "out"), fuse_with_mlx_lm(model_dirs[name], adapters)
    if name == "float16":
        assert set(ours) == set(theirs)
        for key, value in theirs.items():
            assert ours[key].dtype == value.dtype
            # mlx-lm rounds ΔW to float16 before adding it; we round the sum once.
            assert mx.allclose(ours[key], value, atol=2e-3, rtol=2e-3).item(), key
    else:
        assert_close_quantized(ours, theirs, QUANTIZATIONS[name])


def test_dequantize_matches_mlx_lm_fuse_dequantize(model_dirs, tmp_path):
    adapters = write_adapters(model_dirs["4bit"], tmp_path / "adapters", MLX_LM_SPEC)
    fuse_model_dir(model_dirs["4bit"], adapters, tmp_path / "out", dequantize=True)
    ours, theirs = read_weights(tmp_path / "out"), fuse_with_mlx_lm(model_dirs["4bit"], adapters, dequantize=True)
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and mx.allclose(ours[key], value, atol=2e-3, rtol=2e-3).item(), key


def test_mlx_lm_adapter_directory_is_translated(model_dirs, tmp_path):
    ours_dir = write_adapters(model_dirs["float16"], tmp_path / "ours", MLX_LM_SPEC)
    theirs_dir = write_adapters(model_dirs["float16"], tmp_path / "theirs", MLX_LM_SPEC, mlx_lm_only=True)
    assert "adapterspec" not in json.loads((theirs_dir / "adapter_config.json").read_text())
    fuse_model_dir(model_dirs["float16"], theirs_dir, tmp_path / "theirs-fused")
    fuse_model_dir(model_dirs["float16"], ours_dir, tmp_path / "ours-fused")
    assert_equal(read_weights(tmp_path / "theirs-fused"), fuse_in_memory(model_dirs["float16"], ours_dir))
    assert_equal(read_weights(tmp_path / "theirs-fused"), read_weights(tmp_path / "ours-fused"))


# ── the output directory ────────────────────────────────────────────────────


def test_output_is_sharded_like_mlx_lm(model_dirs, tmp_path):
    adapters = write_adapters(model_dirs["float16"], tmp_path / "adapters", MIXED_SPEC)
    result = fuse_model_dir(model_dirs["float16"], adapters, tmp_path / "out", max_shard_bytes=60_000)
    out = tmp_path / "out"
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) == len(result.shards) > 3
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum((out / f).stat().st_size for f in files) - sum(
        8 + int.from_bytes((out / f).read_bytes()[:8], "little") for f in files
    )
    original = json.loads((model_dirs["float16"] / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_parameters"] == original["metadata"]["total_parameters"]
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    for shard in result.shards:
        assert shard.nbytes <= 60_000 or len(shard.tensors) == 1
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / name).read_bytes() == (model_dirs["float16"] / name).read_bytes()
    # The config is the model's, plus generation_config.json's eos_token_id, as mlx-lm's fuse writes it.
    from mlx_lm.utils import load_config

    assert json.loads((out / "config.json").read_text()) == load_config(model_dirs["float16"])


def test_quantized_total_parameters_count_unpacked_weights(model_dirs, tmp_path):
    adapters = write_adapters(model_dirs["4bit"], tmp_path / "adapters", MLX_LM_SPEC)
    fuse_model_dir(model_dirs["4bit"], adapters, tmp_path / "out", requantization="plain")
    ours = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["metadata"]
    original = json.loads((model_dirs["4bit"] / "model.safetensors.index.json").read_text())["metadata"]
    assert ours == original


def test_fused_model_loads_with_mlx_lm_and_matches_the_adapted_model(model_dirs, tmp_path):
    import mlx_lm

    from adapterspec.adapters.weights import load_adapters

    adapters = write_adapters(model_dirs["float32"], tmp_path / "adapters", MIXED_SPEC)
    fuse_model_dir(model_dirs["float32"], adapters, tmp_path / "out", max_shard_bytes=200_000)
    fused, tokenizer = mlx_lm.load(str(tmp_path / "out"))
    adapted, _ = tiny.load(model_dirs["float32"])
    load_adapters(adapted, adapters)
    adapted.eval()
    tokens = mx.array([tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    expected, got = adapted(tokens), fused(tokens)
    assert mx.allclose(got, expected, atol=1e-4, rtol=1e-4).item()
    plain, _ = tiny.load(model_dirs["float32"])
    assert not mx.allclose(plain(tokens), expected, atol=1e-2).item()


def test_plan_needs_no_mlx_and_reports_the_units(model_dirs, tmp_path):
    adapters = write_adapters(model_dirs["4bit"], tmp_path / "adapters", MLX_LM_SPEC)
    plan = plan_fuse(model_dirs["4bit"], adapters)
    assert len(plan.fused_units) == 3 * 5
    assert all(u.requantize and u.quantization.bits == 4 for u in plan.fused_units)
    assert plan_fuse(model_dirs["4bit"], adapters, dequantize=True).units[0].requantize is False


def test_inputs_are_never_modified(model_dirs, tmp_path):
    adapters = write_adapters(model_dirs["4bit"], tmp_path / "adapters", MLX_LM_SPEC)
    before = tree_hash(model_dirs["4bit"]), tree_hash(adapters)
    fuse_model_dir(model_dirs["4bit"], adapters, tmp_path / "out", keep_precision="auto")
    fuse_model_dir(model_dirs["4bit"], adapters, tmp_path / "out", dequantize=True, force=True)
    assert (tree_hash(model_dirs["4bit"]), tree_hash(adapters)) == before


def test_output_directory_is_readable_like_a_mkdir(model_dirs, tmp_path):
    import os

    adapters = write_adapters(model_dirs["float16"], tmp_path / "adapters", MLX_LM_SPEC)
    fuse_model_dir(model_dirs["float16"], adapters, tmp_path / "out")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


def test_adapters_for_another_model_are_refused(model_dirs, tmp_path):
    from adapterspec.errors import UserError

    moe = tiny.write(tmp_path / "moe", "mixtral")
    adapters = write_adapters(moe, tmp_path / "adapters", MOE_SPEC)
    with pytest.raises(UserError, match="made for another model"):
        fuse_model_dir(model_dirs["float16"], adapters, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_adapter_tensors_are_refused(model_dirs, tmp_path):
    from adapterspec.errors import UserError

    adapters = write_adapters(model_dirs["float16"], tmp_path / "adapters", MLX_LM_SPEC)
    weights = dict(mx.load(str(adapters / "adapters.safetensors")))
    weights.pop(next(iter(weights)))
    mx.save_safetensors(str(adapters / "adapters.safetensors"), weights)
    with pytest.raises(UserError, match="is missing"):
        fuse_model_dir(model_dirs["float16"], adapters, tmp_path / "out")


def test_fast_dequantize_is_bit_exact():
    from adapterspec.fuse.merge_mlx import dequantize
    from adapterspec.fuse.plan import Quantization

    mx.random.seed(3)
    for dtype in (mx.float16, mx.bfloat16, mx.float32):
        for bits, group_size in ((2, 64), (4, 32), (4, 64), (8, 32), (8, 128)):
            w = (mx.random.normal((3, 24, 256)) * 0.05).astype(dtype)
            parts = mx.quantize(w, group_size=group_size, bits=bits)
            q = Quantization(group_size, bits, "affine")
            assert mx.array_equal(dequantize(*parts, q), mx.dequantize(*parts, group_size=group_size, bits=bits)).item()


def test_adapter_weights_holding_nan_are_refused_by_name(model_dirs, tmp_path):
    from adapterspec.errors import UserError

    adapters = write_adapters(model_dirs["float16"], tmp_path / "adapters", MLX_LM_SPEC)
    weights = dict(mx.load(str(adapters / "adapters.safetensors")))
    name = sorted(weights)[0]
    weights[name] = mx.full(weights[name].shape, float("nan"), dtype=weights[name].dtype)
    mx.save_safetensors(str(adapters / "adapters.safetensors"), weights)
    with pytest.raises(UserError, match=f"tensor '{name}' holds NaN"):
        fuse_model_dir(model_dirs["float16"], adapters, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_fused_weight_that_overflows_is_an_error(model_dirs, tmp_path):
    from adapterspec.errors import UserError

    adapters = write_adapters(model_dirs["float16"], tmp_path / "adapters", MLX_LM_SPEC)
    weights = dict(mx.load(str(adapters / "adapters.safetensors")))
    weights = {k: mx.full(v.shape, 3e4, dtype=v.dtype) for k, v in weights.items()}  # finite, but A·B overflows float16
    mx.save_safetensors(str(adapters / "adapters.safetensors"), weights)
    with pytest.raises(UserError, match="NaN or infinite values"):
        fuse_model_dir(model_dirs["float16"], adapters, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_erasure_measure_on_several_threads_equals_one(model_dirs, tmp_path, monkeypatch):
    """The numpy measure splits its batches over threads on a large machine; every figure stays the same."""
    from adapterspec.fuse import erasure

    adapter_dir = write_adapters(model_dirs["4bit"], tmp_path / "ad", MIXED_SPEC)
    reports = {}
    for threads in (1, 4):
        monkeypatch.setattr(erasure, "measuring_threads", lambda threads=threads: threads)
        monkeypatch.setattr(erasure, "BATCH_ELEMENTS", 1)  # one unit a batch: as many batches as units
        result = fuse_model_dir(model_dirs["4bit"], adapter_dir, tmp_path / f"out{threads}")
        reports[threads] = [(m.path, m.kept, m.error, m.status) for m in result.report.modules]
    assert len(reports[1]) > 4
    assert reports[4] == reports[1]


def test_measuring_threads_leave_a_small_machine_one(monkeypatch):
    from adapterspec.fuse import erasure

    monkeypatch.setattr(erasure.os, "cpu_count", lambda: 2)
    assert erasure.measuring_threads() == 1
    monkeypatch.setattr(erasure.os, "cpu_count", lambda: 64)
    assert erasure.measuring_threads() == erasure.MAX_MEASURING_THREADS
