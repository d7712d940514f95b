"""A Hugging Face MoE checkpoint directory (per-expert tensors) is the model mlx-lm loads from it, for every command:
the directory index equals the live index of `mlx_lm.load`, plan agrees, apply → fuse works on the same directory
(the fused model computes the adapted model's logits), tree/lint/explain show the stacked modules, and PEFT
adapters imported against the directory load in adapterspec and mlx-lm."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import models as tiny  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402
from mlx_lm.utils import load_model as mlx_lm_load_model  # noqa: E402

from adapterspec.adapters.weights import load_adapters  # noqa: E402
from adapterspec.cli import main  # noqa: E402
from adapterspec.language.lint import parse_spec  # noqa: E402
from adapterspec.model.index import ModuleIndex  # noqa: E402
from adapterspec.model.plan import make_plan  # noqa: E402

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gemma4_text")
# where mlx-lm puts each architecture's stacked experts (gemma4_text: from transformers 5's fused experts)
SWITCH = {"mixtral": "block_sparse_moe.switch_mlp", "qwen2_moe": "mlp.switch_mlp", "qwen3_moe": "mlp.switch_mlp",
          "olmoe": "mlp.switch_mlp", "gemma4_text": "experts.switch_glu"}  # fmt: skip
# gate_proj only on the experts: up_proj and down_proj are copied, stacked, from the per-expert tensors
SPEC = """adapterspec 1

layers[*].**.<switch_mlp,switch_glu>.gate_proj: lora(r=4, scale=2.0)
layers[*].self_attn.<q,v>_proj: lora(r=4)
"""
TOKENS = [[1, 5, 9, 14, 2, 7, 3]]


@pytest.fixture(scope="module", params=ARCHS)
def hf_dir(request, tmp_path_factory):
    return request.param, tiny.write_hf_moe(tmp_path_factory.mktemp(request.param) / "hf", request.param)


def live_model(path):
    model, _ = mlx_lm_load_model(path)
    return model


def described(index: ModuleIndex) -> dict:
    """What both indexes can tell of every module with parameters: class of the adaptable ones, family, dims."""
    return {
        m.path: (m.cls if m.adaptable else m.family, m.input_dims, m.output_dims, m.num_experts, m.dtype)
        for m in index
        if m.has_params
    }


def logits(model) -> np.ndarray:
    return np.array(model(mx.array(TOKENS)).astype(mx.float32))


def test_the_stored_layout_is_hugging_faces(hf_dir):
    arch, path = hf_dir
    stored = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    if arch in tiny.HF_FUSED_EXPERTS:
        assert "model.layers.0.experts.gate_up_proj" in stored and "model.layers.2.self_attn.k_proj.weight" in stored
    else:
        leaf = "w1" if arch == "mixtral" else "gate_proj"
        assert f"model.layers.0.{SWITCH[arch].split('.')[0]}.experts.3.{leaf}.weight" in stored
    assert not any("switch_" in name for name in stored)


def test_directory_index_is_the_live_index(hf_dir):
    arch, path = hf_dir
    from_dir, live = ModuleIndex.from_model_dir(path), ModuleIndex.from_module(live_model(path))
    assert described(from_dir) == described(live)
    switch = from_dir[f"model.layers.1.{SWITCH[arch]}.down_proj"]
    assert (switch.cls, switch.num_experts) == ("SwitchLinear", 4)
    assert not any(re.search(r"experts\.\d", p) for p in from_dir.modules)
    assert from_dir.block_list == live.block_list and from_dir.tied_embeddings == live.tied_embeddings


def test_plan_on_the_directory_is_the_plan_on_the_live_model(hf_dir):
    _, path = hf_dir
    spec = parse_spec(SPEC)
    on_dir = make_plan(spec, ModuleIndex.from_model_dir(path))
    on_live = make_plan(spec, ModuleIndex.from_module(live_model(path)))
    assert on_dir.ok and on_live.ok
    assert [(e.path, e.adapter, e.r) for e in on_dir.entries] == [(e.path, e.adapter, e.r) for e in on_live.entries]
    assert on_dir.trainable_parameters == on_live.trainable_parameters
    assert any(e.adapter == "switch-lora" for e in on_dir.entries)


def test_apply_then_fuse_on_the_same_directory(hf_dir, tmp_path, capsys):
    arch, path = hf_dir
    (tmp_path / "s.aspec").write_text(SPEC)
    assert main(["apply", str(path), str(tmp_path / "s.aspec"), "-o", str(tmp_path / "ad"), "--seed", "3"]) == 0
    # trained adapters: lora_b is zero when fresh, so give every B random values
    weights = mx.load(str(tmp_path / "ad" / "adapters.safetensors"))
    mx.random.seed(4)
    weights = {k: mx.random.normal(v.shape) * 0.05 if k.endswith("lora_b") else v for k, v in weights.items()}
    mx.save_safetensors(str(tmp_path / "ad" / "adapters.safetensors"), weights)
    before = (tmp_path / "ad" / "adapters.safetensors").read_bytes()

    assert main(["fuse", str(path), str(tmp_path / "ad"), "-o", str(tmp_path / "fused")]) == 0
    capsys.readouterr()
    adapted = live_model(path)
    load_adapters(adapted, tmp_path / "ad")
    fused = live_model(tmp_path / "fused")
    np.testing.assert_allclose(logits(fused), logits(adapted), rtol=1e-4, atol=1e-4)
    # bit for bit the adapter layers' own fuse, tensor by tensor
    fused_layers = [(n, m.fuse()) for n, m in adapted.named_modules() if hasattr(m, "lora_a")]
    reference = dict(tree_flatten(adapted.update_modules(tree_unflatten(fused_layers)).parameters()))
    written = {}
    for shard in (tmp_path / "fused").glob("*.safetensors"):
        written.update(mx.load(str(shard)))
    assert set(written) == set(reference)
    for name, value in reference.items():
        assert mx.array_equal(written[name], value), name
    assert not np.allclose(logits(fused), logits(live_model(path)), atol=1e-3)  # the adapters did change it

    # the fused model is written in mlx-lm's stacked layout, its index consistent with its files
    stored = json.loads((tmp_path / "fused" / "model.safetensors.index.json").read_text())["weight_map"]
    assert f"model.layers.0.{SWITCH[arch]}.up_proj.weight" in stored
    assert not any(re.search(r"experts\.(\d|gate_up_proj|down_proj$)", name) for name in stored)
    assert described(ModuleIndex.from_model_dir(tmp_path / "fused")) == described(ModuleIndex.from_model_dir(path))
    assert (tmp_path / "ad" / "adapters.safetensors").read_bytes() == before

    # apply --fuse in one step writes the same weights
    assert main(["apply", str(path), str(tmp_path / "s.aspec"), "--adapters", str(tmp_path / "ad"), "--fuse",
                 "-o", str(tmp_path / "fused2")]) == 0  # fmt: skip
    np.testing.assert_array_equal(logits(live_model(tmp_path / "fused2")), logits(fused))


def test_tree_lint_and_explain_show_the_stacked_modules(hf_dir, tmp_path, capsys):
    arch, path = hf_dir
    switch = f"model.layers.0.{SWITCH[arch]}.gate_proj"
    assert main(["tree", str(path), "--no-fold"]) == 0
    out = capsys.readouterr().out
    assert SWITCH[arch].rsplit(".", 1)[-1] in out and "SwitchLinear" in out and "experts.0" not in out
    (tmp_path / "s.aspec").write_text(SPEC)
    assert main(["lint", "--model", str(path), str(tmp_path / "s.aspec")]) == 0
    assert main(["explain", str(tmp_path / "s.aspec"), str(path), switch]) == 0
    out = capsys.readouterr().out
    assert switch in out and "switch-lora" in out


def expert_peft(index: ModuleIndex, arch: str, seed: int = 0) -> dict:
    """PEFT LoRA factors (transformers 4 names: one module per expert) on every expert's gate projection."""
    rng = np.random.default_rng(seed)
    leaf = tiny.HF_EXPERT_NAMES.get(arch, {}).get("gate_proj", "gate_proj")
    tensors = {}
    for info in index:
        if info.family == "switch" and info.name == "gate_proj":
            owner = info.path.rsplit(".", 2)[0]
            for expert in range(info.num_experts):
                key = f"base_model.model.{owner}.experts.{expert}.{leaf}"
                a = rng.normal(size=(4, info.input_dims)).astype(np.float32)
                tensors[f"{key}.lora_A.weight"] = mx.array(a)
                tensors[f"{key}.lora_B.weight"] = mx.array(rng.normal(size=(info.output_dims, 4)).astype(np.float32))
    return tensors


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_import_peft_against_the_directory_loads_in_adapterspec_and_mlx_lm(arch, tmp_path, capsys):
    from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters

    path = tiny.write_hf_moe(tmp_path / "hf", arch)
    leaf = tiny.HF_EXPERT_NAMES.get(arch, {}).get("gate_proj", "gate_proj")
    peft = tmp_path / "peft"
    peft.mkdir()
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": [leaf]}
    (peft / "adapter_config.json").write_text(json.dumps(config))
    tensors = expert_peft(ModuleIndex.from_model_dir(path), arch)
    mx.save_safetensors(str(peft / "adapter_model.safetensors"), tensors)

    rc = main(["import", "peft", str(peft), "--model", str(path), "-o", str(tmp_path / "s.aspec"),
               "--adapters-out", str(tmp_path / "ours")])  # fmt: skip
    assert rc == 0, capsys.readouterr()
    ours = load_adapters(adapted := live_model(path), tmp_path / "ours")
    assert {e.adapter for e in ours.entries} == {"switch-lora"}

    # the adapted expert computes the base plus PEFT's own update, scale lora_alpha / r = 2
    switch = adapted.model.layers[0]
    switch = getattr(switch, "block_sparse_moe", None) or switch.mlp
    x = mx.random.normal((1, 3, 64))
    expert = 2
    key = f"base_model.model.{ours.entries[0].path.rsplit('.', 2)[0]}.experts.{expert}.{leaf}"
    delta = 2.0 * (tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"])
    indices = mx.full((1, 3, 1), expert)
    base = switch.switch_mlp.gate_proj.linear(x[..., None, None, :], indices)
    got = switch.switch_mlp.gate_proj(x[..., None, None, :], indices)
    np.testing.assert_allclose(np.array(got - base)[..., 0, 0, :], np.array(x @ delta.T), rtol=1e-4, atol=1e-4)

    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["adapterspec"]["mlx_lm_compatible"] is True
    by_mlx_lm = mlx_lm_load_adapters(live_model(path), str(tmp_path / "ours"))
    np.testing.assert_allclose(logits(by_mlx_lm), logits(adapted), rtol=1e-5, atol=1e-5)


# ── layouts mlx-lm does not read: refused by every command, as mlx_lm.load refuses them ──


def write_fused_experts(path) -> None:
    """Turn a per-expert qwen3_moe checkpoint into transformers 5's fused layout: `mlp.experts.gate_up_proj`
    (experts, 2·moe_intermediate, hidden) and `mlp.experts.down_proj` (experts, hidden, moe_intermediate)."""
    index_path = path / "model.safetensors.index.json"
    weight_map = json.loads(index_path.read_text())["weight_map"]
    weights = {}
    for filename in sorted(set(weight_map.values())):
        weights.update(mx.load(str(path / filename)))
        (path / filename).unlink()
    fused = {}
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp.experts"
        experts = range(4)
        gate_up = [mx.concatenate([weights.pop(f"{prefix}.{e}.gate_proj.weight"),
                                   weights.pop(f"{prefix}.{e}.up_proj.weight")]) for e in experts]  # fmt: skip
        fused[f"{prefix}.gate_up_proj"] = mx.stack(gate_up)
        fused[f"{prefix}.down_proj"] = mx.stack([weights.pop(f"{prefix}.{e}.down_proj.weight") for e in experts])
    weights.update(fused)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    index_path.write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(weights, "model.safetensors")}))


def test_fused_transformers5_experts_are_refused_as_mlx_lm_refuses_them(tmp_path, capsys):
    path = tiny.write_hf_moe(tmp_path / "hf", "qwen3_moe")
    write_fused_experts(path)
    with pytest.raises(ValueError):  # mlx-lm 0.32.2's qwen3_moe sanitize does not read the fused layout
        mlx_lm_load_model(path)
    (tmp_path / "s.aspec").write_text(SPEC)
    for argv in (["tree", str(path)], ["plan", str(path), str(tmp_path / "s.aspec")],
                 ["lint", "--model", str(path), str(tmp_path / "s.aspec")]):  # fmt: skip
        assert main(argv) != 0
        err = capsys.readouterr().err
        assert "'model.layers.0.mlp.experts.down_proj' is transformers' fused expert layout" in err, err
        assert "mlx_lm.convert" in err and "per-expert" in err and "Traceback" not in err


def test_a_missing_expert_is_refused(tmp_path, capsys):
    path = tiny.write_hf_moe(tmp_path / "hf", "mixtral", shards=1)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    filename = "model-00001-of-00001.safetensors"
    weights = mx.load(str(path / filename))
    missing = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    del weights[missing], index["weight_map"][missing]
    mx.save_safetensors(str(path / filename), weights, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    assert main(["tree", str(path)]) != 0
    err = capsys.readouterr().err
    assert f"'{missing}' is missing" in err and "Traceback" not in err


def test_a_tied_head_stored_anyway_is_dropped_as_mlx_lm_drops_it(tmp_path):
    """qwen3_moe's sanitize drops `lm_head.weight` when the embeddings are tied; the index sees no head either."""
    path = tiny.write_hf_moe(tmp_path / "hf", "qwen3_moe", shards=1, tie_word_embeddings=True)
    filename = "model-00001-of-00001.safetensors"
    weights = mx.load(str(path / filename))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    mx.save_safetensors(str(path / filename), weights, metadata={"format": "pt"})
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["lm_head.weight"] = filename
    index_path.write_text(json.dumps(index))
    from_dir, live = ModuleIndex.from_model_dir(path), ModuleIndex.from_module(live_model(path))
    assert "lm_head" not in from_dir and described(from_dir) == described(live)
    assert from_dir.tied_embeddings and live.tied_embeddings


def test_export_peft_from_the_directory_names_experts_as_hugging_face_does(tmp_path, capsys):
    path = tiny.write_hf_moe(tmp_path / "hf", "mixtral")
    (tmp_path / "s.aspec").write_text(SPEC)
    assert main(["apply", str(path), str(tmp_path / "s.aspec"), "-o", str(tmp_path / "ad")]) == 0
    assert main(["export", "peft", str(path), str(tmp_path / "ad"), "-o", str(tmp_path / "peft")]) == 0
    keys = mx.load(str(tmp_path / "peft" / "adapter_model.safetensors"))
    expert_keys = [k for k in keys if ".experts." in k]
    assert "base_model.model.model.layers.1.block_sparse_moe.experts.3.w1.lora_A.weight" in expert_keys
    assert len(expert_keys) == 2 * 4 * 2  # layers × experts × (lora_A, lora_B)
    assert not any("switch_mlp" in k for k in keys)


def test_a_quantized_per_expert_checkpoint_is_stacked_with_its_scales(tmp_path, capsys):
    """mlx-lm's mixtral sanitize stacks scales and biases with the weights; index and fuse see the same."""
    path = tiny.write_hf_moe(tmp_path / "hf", "mixtral", quantization=tiny.Q4, dtype="float16")
    stored = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.block_sparse_moe.experts.1.w2.scales" in stored
    from_dir, live = ModuleIndex.from_model_dir(path), ModuleIndex.from_module(live_model(path))
    assert described(from_dir) == described(live)
    switch = from_dir["model.layers.0.block_sparse_moe.switch_mlp.down_proj"]
    assert (switch.cls, switch.bits, switch.group_size, switch.num_experts) == ("QuantizedSwitchLinear", 4, 32, 4)

    (tmp_path / "s.aspec").write_text(SPEC)
    assert main(["apply", str(path), str(tmp_path / "s.aspec"), "-o", str(tmp_path / "ad")]) == 0
    weights = mx.load(str(tmp_path / "ad" / "adapters.safetensors"))
    mx.random.seed(5)
    weights = {k: mx.random.normal(v.shape) if k.endswith("lora_b") else v for k, v in weights.items()}
    mx.save_safetensors(str(tmp_path / "ad" / "adapters.safetensors"), weights)
    assert main(["fuse", str(path), str(tmp_path / "ad"), "-o", str(tmp_path / "fused")]) == 0
    capsys.readouterr()
    adapted = live_model(path)
    load_adapters(adapted, tmp_path / "ad")
    fused_layers = [(n, m.fuse()) for n, m in adapted.named_modules() if hasattr(m, "lora_a")]
    reference = dict(tree_flatten(adapted.update_modules(tree_unflatten(fused_layers)).parameters()))
    written = mx.load(str(tmp_path / "fused" / "model.safetensors"))
    assert set(written) == set(reference)
    for name, value in reference.items():
        assert mx.array_equal(written[name], value), name
    assert "model.layers.1.block_sparse_moe.switch_mlp.gate_proj.scales" in written
    np.testing.assert_array_equal(logits(live_model(tmp_path / "fused")), logits(adapted))
