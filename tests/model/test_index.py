"""ModuleIndex: from a live module and from a model directory, and their agreement on real mlx-lm models."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import models as tiny
import pytest

from adapterspec.errors import UserError
from adapterspec.model.index import (
    GUESSED_CLASSES,
    ModuleIndex,
    infos_from_tensors,
    natural_key,
)

# arch → (linear modules per block, switch modules per block, has an lm_head)
SHAPES = {
    "llama": (7, 0, True),
    "mixtral": (5, 3, True),
    "qwen2_moe": (9, 3, True),
    "phi3": (4, 0, True),
    "gemma": (7, 0, False),
}
PLANNING_FIELDS = (
    "cls", "family", "input_dims", "output_dims", "num_experts", "bias", "dtype",
    "bits", "group_size", "mode", "num_params", "has_params",
)  # fmt: skip


@pytest.fixture(scope="module")
def built():
    """(model, config) per (arch, quantized), built once for the module."""
    cache = {}

    def get(arch, quantized=False):
        if (arch, quantized) not in cache:
            cache[arch, quantized] = tiny.build(arch, quantization=tiny.Q4 if quantized else None)
        return cache[arch, quantized]

    return get


# ── from_module ─────────────────────────────────────────────────────────────


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "q4"])
@pytest.mark.parametrize("arch", tiny.ARCHITECTURES)
def test_from_module_families_and_counts(built, arch, quantized):
    from mlx_lm.utils import get_total_parameters

    model, config = built(arch, quantized)
    index = ModuleIndex.from_module(model)
    blocks = config["num_hidden_layers"]
    linear, switch, has_head = SHAPES[arch]

    assert len(index.by_family("linear")) == linear * blocks + has_head
    assert len(index.by_family("switch")) == switch * blocks
    assert [m.path for m in index.by_family("embedding")] == ["model.embed_tokens"]
    assert [m.path for m in index.by_family("list")] == ["model.layers"]
    assert index.list_length("model.layers") == blocks
    assert index.total_params == get_total_parameters(model)
    assert index.tied_embeddings is (not has_head)
    assert index.model_type == arch
    assert index.source == "module"
    for info in index.by_family("linear", "switch", "embedding"):
        assert info.quantized is quantized
        assert info.dtype == "float32"
        if quantized:
            assert (info.bits, info.group_size, info.mode) == (4, 32, "affine")
            assert info.cls.startswith("Quantized")


def test_from_module_dims_of_llama(built):
    index = ModuleIndex.from_module(built("llama")[0])
    attn = "model.layers.0.self_attn"
    assert (index[f"{attn}.q_proj"].input_dims, index[f"{attn}.q_proj"].output_dims) == (64, 64)
    assert (index[f"{attn}.k_proj"].input_dims, index[f"{attn}.k_proj"].output_dims) == (64, 32)
    assert (index["model.layers.0.mlp.down_proj"].input_dims, index["model.layers.0.mlp.down_proj"].output_dims) == (
        128,
        64,
    )
    embed = index["model.embed_tokens"]
    assert (embed.cls, embed.input_dims, embed.output_dims, embed.num_params) == ("Embedding", 320, 64, 320 * 64)
    assert index["lm_head"].num_params == 320 * 64 and not index["lm_head"].bias
    rope = index[f"{attn}.rope"]
    assert (rope.cls, rope.family, rope.has_params, rope.num_params) == ("RoPE", "leaf", False, 0)
    norm = index["model.layers.0.input_layernorm"]
    assert (norm.cls, norm.family, norm.has_params, norm.num_params) == ("RMSNorm", "leaf", True, 64)
    assert index["model.layers.0"].family == "container" and not index["model.layers.0"].has_params


def test_quantized_dims_are_logical(built):
    plain = ModuleIndex.from_module(built("qwen2_moe")[0])
    quant = ModuleIndex.from_module(built("qwen2_moe", True)[0])
    for info in plain.by_family("linear", "switch", "embedding"):
        q = quant[info.path]
        assert (q.input_dims, q.output_dims, q.num_experts, q.num_params, q.bias) == (
            info.input_dims, info.output_dims, info.num_experts, info.num_params, info.bias
        )  # fmt: skip


def test_switch_layers_of_moe(built):
    index = ModuleIndex.from_module(built("qwen2_moe")[0])
    gate = index["model.layers.1.mlp.switch_mlp.gate_proj"]
    assert (gate.cls, gate.family, gate.num_experts, gate.input_dims, gate.output_dims) == (
        "SwitchLinear",
        "switch",
        4,
        64,
        64,
    )
    assert gate.num_params == 4 * 64 * 64
    assert index["model.layers.1.mlp.shared_expert_gate"].output_dims == 1
    assert index["model.layers.0.self_attn.q_proj"].bias  # qwen2 attention has biases
    assert index["model.layers.1.mlp.switch_mlp"].family == "container"
    assert index["model.layers.1.mlp.switch_mlp.activation"].family == "leaf"


def test_natural_order_children_and_descendants():
    model, _ = tiny.build("llama", num_hidden_layers=12)
    index = ModuleIndex.from_module(model)
    paths = list(index.modules)
    assert paths == sorted(paths, key=natural_key)
    blocks = [m.path for m in index.children("model.layers")]
    assert blocks == [f"model.layers.{i}" for i in range(12)]
    assert paths.index("model.layers.2") < paths.index("model.layers.10")
    assert [m.path for m in index.children()] == ["lm_head", "model"]
    below = [m.path for m in index.descendants("model.layers.1")]
    assert below and all(p.startswith("model.layers.1.") for p in below)
    assert "model.layers.1.mlp.up_proj" in below
    assert len(index.descendants("model.layers")) == 12 * len(index.descendants("model.layers.0")) + 12
    assert index.descendants("") == list(index)
    with pytest.raises(ValueError):
        index.list_length("model.layers.0")


def test_subclasses_are_recognised_by_mro():
    import mlx.nn as nn

    class ScaledLinear(nn.Linear):
        pass

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = ScaledLinear(8, 4, bias=True)
            self.experts = [nn.Linear(4, 4), nn.Linear(4, 4)]
            self.table = {"a": nn.Embedding(10, 4)}

    index = ModuleIndex.from_module(Block())
    proj = index["proj"]
    assert (proj.cls, proj.family, proj.input_dims, proj.output_dims, proj.bias) == (
        "ScaledLinear",
        "linear",
        8,
        4,
        True,
    )
    assert (index["experts"].family, index.list_length("experts")) == ("list", 2)
    assert (index["table"].cls, index["table"].family) == ("dict", "container")
    assert index["table.a"].family == "embedding"


def test_tied_llama_has_no_head():
    model, _ = tiny.build("llama", tie_word_embeddings=True, num_hidden_layers=1)
    index = ModuleIndex.from_module(model)
    assert "lm_head" not in index and index.tied_embeddings


# ── from_model_dir and agreement ────────────────────────────────────────────


def assert_agree(from_dir: ModuleIndex, from_module: ModuleIndex) -> None:
    """Everything planning needs is the same whichever way the index was built."""

    def planned(index):
        return {m.path: m for m in index if m.family in ("linear", "switch", "embedding", "list") or m.has_params}

    a, b = planned(from_dir), planned(from_module)
    assert sorted(a) == sorted(b)
    for path, info in a.items():
        other = b[path]
        for field in PLANNING_FIELDS:
            if field == "cls" and info.cls in GUESSED_CLASSES:
                continue
            assert getattr(info, field) == getattr(other, field), (path, field)
    for info in from_dir.by_family("list"):
        assert from_dir.list_length(info.path) == from_module.list_length(info.path)
    assert set(from_dir.modules) <= set(from_module.modules)
    assert from_dir.total_params == from_module.total_params
    assert from_dir.tied_embeddings == from_module.tied_embeddings
    assert from_dir.model_type == from_module.model_type


@pytest.mark.parametrize("name", tiny.EXAMPLE_MODELS)
def test_example_models_agree(name):
    path = tiny.example_model_dir(name)
    model, _ = tiny.load(path)
    assert_agree(ModuleIndex.from_model_dir(path), ModuleIndex.from_module(model))


@pytest.mark.parametrize(
    "arch, quantization",
    [(arch, None) for arch in tiny.ARCHITECTURES]
    + [(arch, tiny.Q4) for arch in ("mixtral", "qwen2_moe", "gemma")]
    + [
        ("llama", {"group_size": 32, "bits": 4, "mode": "mxfp4"}),
        ("llama", {"group_size": 64, "bits": 8, "mode": "affine"}),
    ],
)
def test_written_models_agree(tmp_path, arch, quantization):
    path = tiny.write(tmp_path / arch, arch, quantization=quantization, with_tokenizer=False)
    model, _ = tiny.load(path)
    from_dir = ModuleIndex.from_model_dir(path)
    assert from_dir.source == "model_dir"
    assert_agree(from_dir, ModuleIndex.from_module(model))


def test_mixed_quantization_per_module(tmp_path):
    model, config = tiny.build("llama", num_hidden_layers=2)

    def predicate(path, module):
        if path == "lm_head":
            return {"group_size": 64, "bits": 8, "mode": "affine"}
        return not path.endswith("down_proj")

    model, config = tiny.builder.quantize_model(model, config, 32, 4, predicate=predicate)
    assert config["quantization"]["lm_head"]["bits"] == 8
    path = tiny.save(tmp_path / "mixed", model, config, with_tokenizer=False)
    loaded, _ = tiny.load(path)
    from_dir = ModuleIndex.from_model_dir(path)
    assert_agree(from_dir, ModuleIndex.from_module(loaded))
    assert (from_dir["lm_head"].bits, from_dir["lm_head"].group_size) == (8, 64)
    assert not from_dir["model.layers.0.mlp.down_proj"].quantized
    assert from_dir["model.layers.0.mlp.up_proj"].bits == 4


def test_tied_from_config_and_structure(tmp_path):
    path = tiny.write(tmp_path / "gemma", "gemma", num_hidden_layers=1, with_tokenizer=False)
    config = json.loads((path / "config.json").read_text())
    config.pop("tie_word_embeddings")
    (path / "config.json").write_text(json.dumps(config))
    index = ModuleIndex.from_model_dir(path)
    assert index.tied_embeddings and "lm_head" not in index
    assert not ModuleIndex.from_model_dir(tiny.example_model_dir("tiny-llama")).tied_embeddings


def test_from_model_dir_does_not_import_mlx():
    code = (
        "import sys; from adapterspec.model.index import ModuleIndex\n"
        f"index = ModuleIndex.from_model_dir({str(tiny.example_model_dir('tiny-moe'))!r})\n"
        "assert len(index.by_family('switch')) == 9, index\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm', 'transformers', 'numpy'))\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tiny.ROOT)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tiny.ROOT)
    assert result.returncode == 0, result.stderr


# ── shards, errors, header inference ────────────────────────────────────────


def _write_shards(dest: Path, weights: dict, parts: int) -> None:
    import mlx.core as mx

    names = sorted(weights)
    weight_map = {}
    for i in range(parts):
        shard = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {n: weights[n] for n in names[i::parts]}
        mx.save_safetensors(str(dest / shard), chunk, metadata={"format": "mlx"})
        weight_map.update({n: shard for n in chunk})
    index = {"metadata": {}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))


def test_multi_shard_index(tmp_path):
    import mlx.core as mx

    source = tiny.example_model_dir("tiny-moe")
    dest = tmp_path / "sharded"
    dest.mkdir()
    (dest / "config.json").write_text((source / "config.json").read_text())
    _write_shards(dest, mx.load(str(source / "model.safetensors")), parts=3)
    single, sharded = ModuleIndex.from_model_dir(source), ModuleIndex.from_model_dir(dest)
    assert single.modules == sharded.modules
    (dest / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(
        UserError, match="model-00002-of-00003.safetensors named in model.safetensors.index.json is missing"
    ):
        ModuleIndex.from_model_dir(dest)


def test_without_index_reads_every_model_file(tmp_path):
    source = tiny.example_model_dir("tiny-llama")
    dest = tmp_path / "noindex"
    dest.mkdir()
    for name in ("config.json", "model.safetensors"):
        (dest / name).write_bytes((source / name).read_bytes())
    assert ModuleIndex.from_model_dir(dest).modules == ModuleIndex.from_model_dir(source).modules


def test_model_dir_errors(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        ModuleIndex.from_model_dir(tmp_path / "absent")
    with pytest.raises(UserError, match="no config.json"):
        ModuleIndex.from_model_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UserError, match="no model\\*.safetensors"):
        ModuleIndex.from_model_dir(tmp_path)


def test_header_inference_edge_cases():
    f32 = "float32"
    tensors = {
        "backbone.conv1d.weight": (f32, (128, 4, 1)),
        "backbone.conv1d.bias": (f32, (128,)),
        "backbone.mixer.A_log": (f32, (8,)),
        "backbone.mixer.in_proj.weight": (f32, (16, 8)),
        "backbone.wte.weight": (f32, (100, 8)),
        "backbone.ln_f.weight": (f32, (8,)),
        "backbone.ln_f.bias": (f32, (8,)),
        "backbone.gains.0": (f32, (8,)),
        "backbone.gains.1": (f32, (8,)),
        "experts.up.weight": ("uint32", (4, 16, 4)),  # mxfp4: 32 logical inputs, uint8 scales
        "experts.up.scales": ("uint8", (4, 16, 1)),
        "experts.down.weight": ("uint32", (4, 32, 2)),  # nvfp4: 16 logical inputs, one group of 16
        "experts.down.scales": ("uint8", (4, 32, 1)),
    }
    infos = {i.path: i for i in infos_from_tensors(tensors, {})}
    assert infos["backbone.conv1d"].family == "leaf"
    assert infos["backbone.mixer"].family == "container" and infos["backbone.mixer"].num_params == 8
    assert infos["backbone.wte"].family == "embedding" and infos["backbone.wte"].input_dims == 100
    assert infos["backbone.ln_f"].cls == "Norm"
    assert infos["backbone"].num_params == 16 and "backbone.gains" not in infos
    up, down = infos["experts.up"], infos["experts.down"]
    assert (up.family, up.mode, up.bits, up.group_size, up.input_dims, up.num_experts) == (
        "switch",
        "mxfp4",
        4,
        32,
        32,
        4,
    )
    assert (down.mode, down.group_size, down.input_dims, down.dtype) == ("nvfp4", 16, 16, "bfloat16")


# ── performance on the lint path ────────────────────────────────────────────


def _write_header_only_model(dest: Path, blocks: int, experts: int, shards: int) -> int:
    """A quantized MoE model dir with realistic tensor names and tiny zero-filled tensors."""
    dest.mkdir()
    names = {"model.embed_tokens": (64, 32), "lm_head": (64, 32)}
    for b in range(blocks):
        layer = f"model.layers.{b}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[f"{layer}.self_attn.{proj}"] = (32, 32)
        names[f"{layer}.mlp.gate"] = (experts, 32)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[f"{layer}.mlp.switch_mlp.{proj}"] = (experts, 32, 32)
            names[f"{layer}.mlp.shared_expert.{proj}"] = (32, 32)
    tensors = {}
    for name, shape in names.items():
        tensors[f"{name}.weight"] = ("U32", shape[:-1] + (shape[-1] * 4 // 32,))
        tensors[f"{name}.scales"] = ("F16", shape[:-1] + (shape[-1] // 32,))
        tensors[f"{name}.biases"] = ("F16", shape[:-1] + (shape[-1] // 32,))
    for b in range(blocks):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{b}.{norm}.weight"] = ("F16", (32,))
    tensors["model.norm.weight"] = ("F16", (32,))
    ordered = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = ordered[i::shards]
        _write_zero_safetensors(dest / shard, {n: tensors[n] for n in part})
        weight_map.update({n: shard for n in part})
    (dest / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    quant = {"group_size": 32, "bits": 4, "mode": "affine"}
    config = {
        "model_type": "qwen2_moe",
        "quantization": quant,
        "quantization_config": quant,
        "tie_word_embeddings": False,
    }
    (dest / "config.json").write_text(json.dumps(config))
    return len(tensors)


def _write_zero_safetensors(path: Path, tensors: dict) -> None:
    itemsize = {"U32": 4, "F16": 2}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = itemsize[dtype]
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def test_96_block_moe_index_reads_every_block(tmp_path):
    # How long this takes is measured by benchmarks/plan.py (the directory plan of a 96-block model), not here.
    count = _write_header_only_model(tmp_path / "big", blocks=96, experts=64, shards=4)
    assert count > 3000
    index = ModuleIndex.from_model_dir(tmp_path / "big")
    assert len(index.by_family("switch")) == 96 * 3
    assert index.list_length("model.layers") == 96
    assert index["model.layers.95.mlp.switch_mlp.up_proj"].num_experts == 64
