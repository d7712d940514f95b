"""The streaming fuse of switch-DoRA (DoRA on experts): equal to the layers' own `.fuse()`, merged a group of
experts at a time, and the fused model computes what the adapted model computes."""

from __future__ import annotations

import json

import pytest

mx = pytest.importorskip("mlx.core")

import models as tiny  # noqa: E402
from fuse_support import fuse_in_memory, read_weights, write_adapters  # noqa: E402

from adapterspec.adapters.weights import load_adapters  # noqa: E402
from adapterspec.cli import main  # noqa: E402
from adapterspec.fuse.run import fuse_model_dir  # noqa: E402

Q4 = {"group_size": 32, "bits": 4, "mode": "affine"}
SPECS = {
    "mixtral": """adapterspec 1

layers[*].block_sparse_moe.switch_mlp.<gate,up,down>_proj: dora(r=4, scale=2.0)
layers[*].self_attn.q_proj: lora(r=4, scale=2.0)
""",
    "qwen2_moe": """adapterspec 1

layers[*].mlp.switch_mlp.*: dora(r=4)
layers[*].mlp.shared_expert.*: dora(r=4)
""",
}
TOKENS = mx.array([[1, 5, 9, 2, 7, 3, 11, 4, 8, 6, 10, 12]])


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    dirs = {}
    for arch in SPECS:
        for name, quantization in (("float32", None), ("4bit", Q4)):
            dirs[arch, name] = tiny.write(root / f"{arch}-{name}", arch, quantization=quantization)
    return dirs


def assert_equal(ours: dict, reference: dict) -> None:
    assert set(ours) == set(reference)
    for name, value in reference.items():
        assert ours[name].dtype == value.dtype and ours[name].shape == value.shape, name
        assert mx.array_equal(ours[name], value).item(), f"{name} differs"


def adapted_logits(model_dir, adapters) -> mx.array:
    model, _ = tiny.load(model_dir)
    load_adapters(model, adapters)
    return model(TOKENS)


def fused_logits(out_dir) -> mx.array:
    model, _ = tiny.load(out_dir)
    return model(TOKENS)


def rel_err(a, b) -> float:
    return (mx.linalg.norm((a - b).flatten()) / mx.linalg.norm(b.flatten())).item()


@pytest.mark.parametrize("arch", list(SPECS))
@pytest.mark.parametrize("name", ["float32", "4bit"])
def test_fuse_equals_the_layers_own_fuse_merged_expert_by_expert(moe_dirs, tmp_path, monkeypatch, arch, name):
    import adapterspec.fuse.stream as stream

    model_dir = moe_dirs[arch, name]
    adapters = write_adapters(model_dir, tmp_path / "adapters", SPECS[arch])
    plan = json.loads((adapters / "adapter_config.json").read_text())["adapterspec"]["plan"]
    assert "switch-dora" in {m["adapter"] for m in plan["modules"]}
    # the smallest chunks: one row of a linear, one expert of a switch, merged at a time
    monkeypatch.setattr(stream, "CHUNK_BYTES", 1)
    expert_chunks = []
    chunks_of = stream.chunks_of

    def recorded(unit, size):
        chunks = chunks_of(unit, size)
        if ".switch_mlp." in unit.path:
            expert_chunks.extend(chunk.rows for chunk in chunks)
        return chunks

    monkeypatch.setattr(stream, "chunks_of", recorded)
    fuse_model_dir(model_dir, adapters, tmp_path / "out", requantization="plain")  # mlx's arithmetic, as .fuse()
    assert expert_chunks and all(stop - start == 1 for start, stop in expert_chunks)
    assert_equal(read_weights(tmp_path / "out"), fuse_in_memory(model_dir, adapters))


@pytest.mark.parametrize("arch", list(SPECS))
def test_fused_dense_model_computes_the_adapted_models_logits(moe_dirs, tmp_path, arch):
    model_dir = moe_dirs[arch, "float32"]
    adapters = write_adapters(model_dir, tmp_path / "adapters", SPECS[arch])
    fuse_model_dir(model_dir, adapters, tmp_path / "out")
    expected = adapted_logits(model_dir, adapters)
    assert rel_err(fused_logits(tmp_path / "out"), expected) < 1e-5
    plain, _ = tiny.load(model_dir)
    assert rel_err(plain(TOKENS), expected) > 1e-2


@pytest.mark.parametrize("arch", list(SPECS))
def test_fused_4bit_model_dequantized_and_requantized(moe_dirs, tmp_path, arch):
    model_dir = moe_dirs[arch, "4bit"]
    adapters = write_adapters(model_dir, tmp_path / "adapters", SPECS[arch], b_scale=0.5)
    expected = adapted_logits(model_dir, adapters)
    plain, _ = tiny.load(model_dir)
    adapter_effect = rel_err(plain(TOKENS), expected)
    assert adapter_effect > 5e-2

    fuse_model_dir(model_dir, adapters, tmp_path / "dense", dequantize=True)
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization" not in config
    assert rel_err(fused_logits(tmp_path / "dense"), expected) < 1e-5

    fuse_model_dir(model_dir, adapters, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]["bits"] == 4
    requantized, _ = tiny.load(tmp_path / "q")
    assert "scales" in requantized.model.layers[0].parameters()["self_attn"]["q_proj"]
    # requantizing the merged weights moves each by up to half a 4-bit step: the logits stay far closer to
    # the adapted model's than the base model's are
    assert rel_err(requantized(TOKENS), expected) < 0.25 * adapter_effect


def test_erasure_report_measures_switch_dora_experts(moe_dirs, tmp_path, capsys):
    model_dir = moe_dirs["mixtral", "4bit"]
    adapters = write_adapters(model_dir, tmp_path / "adapters", SPECS["mixtral"], b_scale=0.5)
    code = main(["fuse", str(model_dir), str(adapters), "-o", str(tmp_path / "out"),
                 "--report-json", str(tmp_path / "report.json")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    modules = {m["path"]: m for m in json.loads((tmp_path / "report.json").read_text())["modules"]}
    experts = [m for path, m in modules.items() if ".switch_mlp." in path]
    assert len(experts) == 3 * 2  # gate, up and down projections of 2 blocks
    for m in experts:
        assert m["status"] == "ok" and m["kept"] > 0.9 and m["error"] < 0.3, m


@pytest.mark.parametrize("name", ["float32", "4bit"])
def test_apply_with_trained_adapters_and_fuse_on_the_command_line(moe_dirs, tmp_path, capsys, name):
    model_dir = moe_dirs["qwen2_moe", name]
    spec = tmp_path / "experts.aspec"
    spec.write_text(SPECS["qwen2_moe"])
    trained = write_adapters(model_dir, tmp_path / "trained", SPECS["qwen2_moe"], b_scale=0.5)
    weights = str(trained / "adapters.safetensors")
    assert main(["plan", "-v", str(model_dir), str(spec)]) == 0
    out = capsys.readouterr().out
    assert "switch-dora" in out and "DoRA on the experts" in out
    assert main(["apply", str(model_dir), str(spec), "--adapters", weights, "-o", str(tmp_path / "again")]) == 0
    first, again = mx.load(weights), mx.load(str(tmp_path / "again" / "adapters.safetensors"))
    assert first.keys() == again.keys() and any(k.endswith("switch_mlp.up_proj.m") for k in first)
    assert all(mx.array_equal(first[k], again[k]).item() for k in first)
    fused = tmp_path / "fused"
    dequantize = ["--dequantize"] if name == "4bit" else []
    assert (
        main(["apply", str(model_dir), str(spec), "--adapters", weights, "--fuse", *dequantize, "-o", str(fused)]) == 0
    )
    assert rel_err(fused_logits(fused), adapted_logits(model_dir, trained)) < 1e-5
