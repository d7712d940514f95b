"""transformers 5's fused experts (PEFT target_parameters) ↔ switch modules: names, layout choice, and refusals
(the numbers are checked against real PEFT in test_real_clients.py)."""

from __future__ import annotations

import json
import shutil

import pytest

mx = pytest.importorskip("mlx.core")

import models  # noqa: E402

from adapterspec.cli import main  # noqa: E402
from adapterspec.errors import UserError  # noqa: E402
from adapterspec.interop.fused_experts import fused_params, layout_of_version, router_params  # noqa: E402
from adapterspec.interop.peft import export_peft, import_peft, write_imported_adapters  # noqa: E402
from adapterspec.interop.peft_import import translate  # noqa: E402
from adapterspec.model.index import ModuleIndex  # noqa: E402

PREFIX = "base_model.model."
BOTH = ["experts.gate_up_proj", "experts.down_proj"]


def write_peft(path, config: dict, tensors: dict) -> None:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    mx.save_safetensors(str(path / "adapter_model.safetensors"), tensors)


@pytest.mark.parametrize(
    "version, layout",
    [
        ("5.25.0", "target-parameters"),
        ("5.0.0.dev0", "target-parameters"),
        ("4.57.1", "per-expert"),
        (None, "per-expert"),
    ],
)
def test_the_layout_follows_the_transformers_major_version(version, layout):
    assert layout_of_version(version) == layout


def test_fused_names_follow_transformers_5():
    moe = ModuleIndex.from_model_dir(models.example_model_dir("tiny-moe"))
    params = {p.key: p for p in fused_params(moe)}
    gate_up = params["model.layers.2.mlp.experts.gate_up_proj"]
    assert gate_up.mlx_paths == ("model.layers.2.mlp.switch_mlp.gate_proj", "model.layers.2.mlp.switch_mlp.up_proj")
    assert params["model.layers.2.mlp.experts.down_proj"].mlx_paths == ("model.layers.2.mlp.switch_mlp.down_proj",)
    assert [r.key for r in router_params(moe)][0] == "model.layers.0.mlp.gate.weight"


def test_mixtral_block_is_mlp_in_transformers_5(tmp_path):
    index = ModuleIndex.from_model_dir(models.write(tmp_path / "mixtral", "mixtral", with_tokenizer=False))
    params = {p.key: p for p in fused_params(index)}
    assert params["model.layers.0.mlp.experts.down_proj"].mlx_paths == (
        "model.layers.0.block_sparse_moe.switch_mlp.down_proj",
    )
    routers = {r.key: r.mlx_path for r in router_params(index)}
    assert routers["model.layers.0.mlp.gate.weight"] == "model.layers.0.block_sparse_moe.gate"


def test_target_parameters_need_the_model():
    with pytest.raises(UserError, match="without the model: target_parameters"):
        translate({"r": 4, "lora_alpha": 8, "target_modules": [], "target_parameters": BOTH})


def test_target_parameters_on_other_parameters_are_lossy():
    index = ModuleIndex.from_model_dir(models.example_model_dir("tiny-moe"))
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["k_proj"], "target_parameters": ["self_attn.q_proj.weight"]}
    messages = [f.message for f in translate(config, index, layout="target-parameters").lossy]
    assert any("a parameter other than fused experts" in m for m in messages)


def test_fused_factors_of_the_wrong_shape_are_refused(tmp_path):
    model_dir = models.example_model_dir("tiny-moe")
    tensors = {}
    for block in range(3):
        key = f"{PREFIX}model.layers.{block}.mlp.experts"
        tensors[f"{key}.lora_A.weight"] = mx.zeros((4 * 4, 64))  # down_proj's in is 64 here, but E·r must divide
        tensors[f"{key}.lora_B.weight"] = mx.zeros((64, 5 * 4))  # a rank-5 B for a rank-4 A
    write_peft(
        tmp_path / "peft", {"r": 4, "lora_alpha": 8, "target_modules": [], "target_parameters": BOTH[1:]}, tensors
    )
    result = import_peft(tmp_path / "peft", str(model_dir), need_model=True)
    with pytest.raises(UserError, match="lora_B has shape"):
        write_imported_adapters(result, tmp_path / "peft", tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def test_factors_of_an_untargeted_parameter_are_refused(tmp_path):
    model_dir = models.example_model_dir("tiny-moe")
    tensors = {}
    for block in range(3):
        key = f"{PREFIX}model.layers.{block}.mlp.experts"
        tensors[f"{key}.lora_A.weight"] = mx.zeros((16, 64))
        tensors[f"{key}.lora_B.weight"] = mx.zeros((64, 16))
        tensors[f"{key}.base_layer.lora_A.weight"] = mx.zeros((16, 64))
        tensors[f"{key}.base_layer.lora_B.weight"] = mx.zeros((128, 16))
    write_peft(
        tmp_path / "peft", {"r": 4, "lora_alpha": 8, "target_modules": [], "target_parameters": BOTH[1:]}, tensors
    )
    result = import_peft(tmp_path / "peft", str(model_dir), need_model=True)
    with pytest.raises(UserError, match="a parameter the config does not target"):
        write_imported_adapters(result, tmp_path / "peft", tmp_path / "ours")


def _our_adapters(model_dir, out, spec):
    from adapterspec.adapters.install import apply
    from adapterspec.adapters.weights import save_adapters

    model, _ = models.load(model_dir)
    save_adapters(model, apply(model, spec), out)
    return out


def test_export_for_transformers_5_refuses_an_unknown_moe_layout(tmp_path):
    source = models.example_model_dir("tiny-moe")
    adapters = _our_adapters(source, tmp_path / "ours", "switch_mlp.down_proj: lora(r=2)\n")
    odd = tmp_path / "odd-moe"
    shutil.copytree(source, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "model_type": "phimoe", "transformers_version": "5.1.0"}))
    with pytest.raises(UserError, match="not for model type 'phimoe'"):
        export_peft(str(odd), adapters, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    export_peft(str(odd), adapters, tmp_path / "peft", layout="per-expert")
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert written["target_modules"] == ["w2"] and not written.get("target_parameters")


def test_export_refuses_full_experts_for_transformers_5(tmp_path):
    model_dir = models.example_model_dir("tiny-moe")
    adapters = _our_adapters(model_dir, tmp_path / "ours", "layers[0].mlp.switch_mlp.down_proj: full\n")
    with pytest.raises(UserError, match="adapts only with LoRA"):
        export_peft(str(model_dir), adapters, tmp_path / "peft", layout="target-parameters")


def test_peft_layout_is_refused_for_mlx_lm_imports(tmp_path, capsys):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 2}))
    assert main(["import", "mlx-lm", str(tmp_path), "--peft-layout", "per-expert"]) == 2
    assert "--peft-layout is for PEFT adapters" in capsys.readouterr().err


def test_a_router_adapted_as_a_module_means_transformers_4(tmp_path):
    """transformers 5's router is no Linear, so router factors under target_modules come from transformers 4."""
    model_dir = models.example_model_dir("tiny-moe")
    tensors = {}
    for block in range(3):
        key = f"{PREFIX}model.layers.{block}.mlp.gate"
        tensors[f"{key}.lora_A.weight"] = mx.ones((2, 64))
        tensors[f"{key}.lora_B.weight"] = mx.ones((4, 2))
    write_peft(tmp_path / "peft", {"r": 2, "lora_alpha": 4, "target_modules": ["gate"]}, tensors)
    result = import_peft(tmp_path / "peft", str(model_dir), need_model=True)
    assert result.translation.choice.layout == "per-expert"
    assert [e.path for e in result.plan.entries] == [f"model.layers.{b}.mlp.gate" for b in range(3)]
    write_imported_adapters(result, tmp_path / "peft", tmp_path / "ours")
    ours = mx.load(str(tmp_path / "ours" / "adapters.safetensors"))
    assert ours["model.layers.0.mlp.gate.lora_a"].shape == (64, 2)


@pytest.mark.parametrize("layout", ["per-expert", "target-parameters"])
def test_a_tied_moe_model_exports_its_embedding_lora_tied(tmp_path, layout):
    qwen3_moe = dict(models.tiny_config("qwen2_moe"), model_type="qwen3_moe", head_dim=16, decoder_sparse_step=1)
    qwen3_moe.update(mlp_only_layers=[], norm_topk_prob=True, tie_word_embeddings=True)
    model, config = models.builder.build_model(qwen3_moe)
    model_dir = models.save(tmp_path / "moe", model, config, with_tokenizer=False)
    assert ModuleIndex.from_model_dir(model_dir).tied_embeddings
    adapters = _our_adapters(model_dir, tmp_path / "ours", "switch_mlp.gate_proj: lora(r=2)\nembed_tokens: lora(r=4)\n")
    config, _ = export_peft(str(model_dir), adapters, tmp_path / "peft", layout=layout)
    assert config["ensure_weight_tying"] is True
    assert config["rank_pattern"]["lm_head"] == 4


def test_export_refuses_dora_beside_fused_experts(tmp_path):
    model_dir = models.example_model_dir("tiny-moe")
    adapters = _our_adapters(model_dir, tmp_path / "ours", "switch_mlp.gate_proj: lora(r=2)\nq_proj: dora(r=2)\n")
    with pytest.raises(UserError, match="LoRA only"):
        export_peft(str(model_dir), adapters, tmp_path / "peft", layout="target-parameters")
