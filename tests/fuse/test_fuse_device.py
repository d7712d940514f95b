"""Where the merges run: the GPU path (every unit merged by mlx through the pipeline, nothing compiled, products
summed term by term) gives the CPU path's bits, `--device gpu` without a GPU is refused, and the pipeline stops
cleanly on any failure. Without a GPU here, the GPU path runs on the CPU: mlx is told it has a GPU, and the
merge arithmetic is the GPU's."""

from __future__ import annotations

import threading

import pytest

mx = pytest.importorskip("mlx.core")

import models as tiny  # noqa: E402
from fuse_support import MIXED_SPEC, MLX_LM_SPEC, MOE_SPEC, read_weights, write_adapters  # noqa: E402

from adapterspec.cli import main  # noqa: E402
from adapterspec.errors import UserError  # noqa: E402
from adapterspec.fuse.run import fuse_model_dir  # noqa: E402

QUANTIZATIONS = {
    "4bit": {"group_size": 32, "bits": 4, "mode": "affine"},
    "8bit-g64": {"group_size": 64, "bits": 8, "mode": "affine"},
    "mxfp4": {"group_size": 32, "bits": 4, "mode": "mxfp4"},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    dirs = {dtype: tiny.write(root / dtype, "llama", dtype=dtype) for dtype in ("float16", "bfloat16")}
    for name, quantization in QUANTIZATIONS.items():
        dirs[name] = tiny.write(root / name, "llama", dtype="float16", quantization=quantization)
    return dirs


@pytest.fixture
def gpu_path(monkeypatch):
    """mlx reports a GPU: the fuse takes its GPU path (no worker processes, the GPU's arithmetic), run here on
    mlx's default device."""
    take_gpu_path(monkeypatch)


def take_gpu_path(monkeypatch) -> list:
    """What the fuse takes for a GPU, on this device; returns the list of functions compiled meanwhile."""
    import adapterspec.fuse.merge_mlx as merge_mlx

    available = mx.is_available
    monkeypatch.setattr(mx, "is_available", lambda device: True if device == mx.gpu else available(device))
    monkeypatch.setattr(merge_mlx, "on_gpu", lambda: True)
    compiled = []
    compile_ = mx.compile
    monkeypatch.setattr(
        mx, "compile", lambda function, *a, **k: compiled.append(function) or compile_(function, *a, **k)
    )
    return compiled


def fuse_files(model, adapters, out, **options) -> tuple[dict, list]:
    result = fuse_model_dir(model, adapters, out, **options)
    return read_weights(out), result.worker_peak_rss


# A dense model is never requantized: its one case runs with the default.
CASES = [("float16", "grid"), ("bfloat16", "grid")] + [
    (name, requantization) for name in ("4bit", "8bit-g64", "mxfp4") for requantization in ("grid", "plain")
]


@pytest.mark.parametrize("name,requantization", CASES)
def test_gpu_path_gives_the_worker_paths_bits(models, tmp_path, monkeypatch, name, requantization):
    adapters = write_adapters(models[name], tmp_path / "adapters", MLX_LM_SPEC)
    on_cpu, cpu_workers = fuse_files(
        models[name], adapters, tmp_path / "cpu", device="cpu", requantization=requantization
    )
    available = mx.is_available
    monkeypatch.setattr(mx, "is_available", lambda device: True if device == mx.gpu else available(device))
    on_gpu, gpu_workers = fuse_files(
        models[name], adapters, tmp_path / "gpu", device="auto", requantization=requantization
    )
    assert gpu_workers == [], "the GPU path merges in mlx, without worker processes"
    if name != "mxfp4":  # the workers take plain LoRA on float and affine weights only
        assert cpu_workers, "the CPU path merges plain LoRA on worker processes"
    assert set(on_gpu) == set(on_cpu)
    for key, value in on_cpu.items():
        assert on_gpu[key].dtype == value.dtype and mx.array_equal(on_gpu[key], value).item(), key


@pytest.mark.parametrize("case", ["dora-embedding-4bit", "switch-float16", "switch-4bit"])
def test_gpu_path_fuses_every_adapter_kind_like_the_cpu_path(models, tmp_path, monkeypatch, case):
    if case.startswith("switch"):
        quantization = QUANTIZATIONS["4bit"] if case.endswith("4bit") else None
        model = tiny.write(tmp_path / "moe", "mixtral", dtype="float16", quantization=quantization)
        adapters = write_adapters(model, tmp_path / "adapters", MOE_SPEC)
    else:
        model = models["4bit"]
        adapters = write_adapters(model, tmp_path / "adapters", MIXED_SPEC.replace("**.*norm: full\n", ""))
    on_cpu, _ = fuse_files(model, adapters, tmp_path / "cpu", device="cpu")
    take_gpu_path(monkeypatch)
    on_gpu, _ = fuse_files(model, adapters, tmp_path / "gpu", device="gpu")
    assert set(on_gpu) == set(on_cpu)
    assert all(mx.array_equal(on_gpu[key], value).item() for key, value in on_cpu.items())


def test_device_gpu_without_a_gpu_is_refused(models, tmp_path, capsys):
    if mx.is_available(mx.gpu):
        pytest.skip("this mlx has a GPU")
    adapters = write_adapters(models["float16"], tmp_path / "adapters", MLX_LM_SPEC)
    code = main(["fuse", str(models["float16"]), str(adapters), "-o", str(tmp_path / "out"), "--device", "gpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "no GPU" in err and "--device cpu" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_unknown_device_is_refused(models, tmp_path):
    adapters = write_adapters(models["float16"], tmp_path / "adapters", MLX_LM_SPEC)
    with pytest.raises(UserError, match="must be one of auto, gpu, cpu"):
        fuse_model_dir(models["float16"], adapters, tmp_path / "out", device="tpu")


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_a_failing_write_stops_the_pipeline_and_leaves_nothing(models, tmp_path, monkeypatch, gpu_path, failure):
    import adapterspec.fuse.stream as stream

    adapters = write_adapters(models["4bit"], tmp_path / "adapters", MLX_LM_SPEC)
    monkeypatch.setattr(stream, "GPU_CHUNK_BYTES", 40_000)  # many chunks, few in flight: reads wait for writes
    monkeypatch.setattr(stream, "GPU_IN_FLIGHT_BYTES", 100_000)
    written = []
    write = stream.Outputs.write

    def failing_write(self, name, rows, data):
        if len(written) == 5:
            raise failure
        written.append(name)
        write(self, name, rows, data)

    monkeypatch.setattr(stream.Outputs, "write", failing_write)
    with pytest.raises(type(failure)):
        fuse_model_dir(models["4bit"], adapters, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert not [t for t in threading.enumerate() if t.name.startswith("fuse-")], "a pipeline thread is left running"


def test_many_small_chunks_in_a_tight_bound_give_the_same_files(models, tmp_path, monkeypatch, gpu_path):
    import adapterspec.fuse.stream as stream

    adapters = write_adapters(models["4bit"], tmp_path / "adapters", MLX_LM_SPEC)
    whole, _ = fuse_files(models["4bit"], adapters, tmp_path / "whole")
    monkeypatch.setattr(stream, "GPU_CHUNK_BYTES", 20_000)
    monkeypatch.setattr(stream, "GPU_IN_FLIGHT_BYTES", 20_000)  # one chunk in flight at a time
    chunked, _ = fuse_files(models["4bit"], adapters, tmp_path / "chunked")
    assert all(mx.array_equal(chunked[key], value).item() for key, value in whole.items())


@pytest.mark.parametrize("failing", ["merge", "grid"])
def test_kernels_that_fail_their_check_are_not_used_and_the_files_stay_the_same(
    models, tmp_path, monkeypatch, gpu_path, failing
):
    import adapterspec.fuse.merge_cuda as merge_cuda
    import adapterspec.fuse.merge_mlx as merge_mlx

    adapters = write_adapters(models["4bit"], tmp_path / "adapters", MLX_LM_SPEC)
    expected, _ = fuse_files(models["4bit"], adapters, tmp_path / "operations")
    tried = []

    def fails(*args):
        tried.append(args)
        raise RuntimeError("the kernel does not build here")

    def merges_as_the_operations(weight, a, b, scale, dtype, quantized=None):  # a merge kernel that works
        if quantized is not None:
            weight = merge_mlx.dequantize_float32(weight, *quantized)
        return merge_mlx.merge("lora", weight, {"lora_a": a, "lora_b": b}, scale, dtype)

    monkeypatch.setattr(merge_cuda, "enabled", lambda: True)
    monkeypatch.setattr(merge_cuda, "merge", fails if failing == "merge" else merges_as_the_operations)
    monkeypatch.setattr(merge_cuda, "requantize_on_grid", fails)
    for check in (merge_cuda.merge_agrees, merge_cuda.grid_agrees):
        check.cache_clear()
    try:
        got, _ = fuse_files(models["4bit"], adapters, tmp_path / "kernels")
    finally:
        for check in (merge_cuda.merge_agrees, merge_cuda.grid_agrees):
            check.cache_clear()
    assert len(tried) == 1, "the failing kernel was tried once, by its check, and then left alone"
    assert set(got) == set(expected)
    assert all(mx.array_equal(got[key], value).item() for key, value in expected.items())


class FakeNvrtc:
    """Stands for NVRTC where there is none: its version, and every source it is asked to build."""

    def __init__(self):
        self.built = []

    def nvrtcVersion(self, major, minor):
        major._obj.value, minor._obj.value = 13, 0
        return 0


def test_the_kernels_code_is_built_once_and_then_read_from_the_cache(tmp_path, monkeypatch):
    from adapterspec.fuse import cuda_build

    fake = FakeNvrtc()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cuda_build, "_nvrtc", lambda: fake)
    monkeypatch.setattr(cuda_build, "compute_capability", lambda: "90")
    monkeypatch.setattr(cuda_build, "_compile", lambda nvrtc, source, options: fake.built.append(source) or b"code\0")
    assert cuda_build.cubin("kernel one") == b"code\0"
    assert cuda_build.cubin("kernel one") == b"code\0"
    assert fake.built == ["kernel one"], "the second call reads the cache"
    cuda_build.cubin("kernel two")
    assert fake.built == ["kernel one", "kernel two"]
    assert len(list((tmp_path / "adapterspec" / "cuda").iterdir())) == 2
    monkeypatch.setattr(cuda_build, "compute_capability", lambda: "80")  # another GPU: built for it
    cuda_build.cubin("kernel one")
    assert fake.built[-1] == "kernel one" and len(fake.built) == 3


def test_without_nvrtc_the_build_fails_with_a_build_error(monkeypatch):
    from adapterspec.fuse import cuda_build

    monkeypatch.setattr(cuda_build, "_nvrtc", lambda: None)
    with pytest.raises(cuda_build.BuildError):
        cuda_build.cubin("kernel")


def test_pages_are_prefetched_only_where_mlx_computes_on_a_cuda_gpu(monkeypatch):
    from adapterspec.fuse import host_pages

    host_pages.prefetcher.cache_clear()
    try:
        if not mx.cuda.is_available():
            assert host_pages.prefetcher() is None
        monkeypatch.setenv("ADAPTERSPEC_FUSE_PREFETCH", "0")
        host_pages.prefetcher.cache_clear()
        assert host_pages.prefetcher() is None
    finally:
        host_pages.prefetcher.cache_clear()
