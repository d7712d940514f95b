"""PEFT weights of mixture-of-experts models (one module per expert) stacked into switch-LoRA and back, without torch."""

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import models  # noqa: E402

from adapterspec.adapters.fusemath import lora_delta  # noqa: E402
from adapterspec.interop.peft import export_peft, import_peft, write_imported_adapters  # noqa: E402
from adapterspec.model.index import ModuleIndex  # noqa: E402

PREFIX = "base_model.model."


def write_peft(path, config: dict, tensors: dict) -> None:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    mx.save_safetensors(str(path / "adapter_model.safetensors"), tensors)


def expert_factors(index, names: dict, ranks: dict, seed=0) -> dict:
    """Random PEFT factors for the expert modules `names` (HF leaf → MLX switch leaf) of every block."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for info in index:
        if info.family != "switch" or info.name not in names.values():
            continue
        hf_leaf = next(k for k, v in names.items() if v == info.name)
        owner = info.path.rsplit(".", 2)[0]
        for expert in range(info.num_experts):
            r = ranks.get(expert, 4)
            key = f"{PREFIX}{owner}.experts.{expert}.{hf_leaf}"
            tensors[f"{key}.lora_A.weight"] = mx.array(rng.normal(size=(r, info.input_dims)).astype(np.float32))
            tensors[f"{key}.lora_B.weight"] = mx.array(rng.normal(size=(info.output_dims, r)).astype(np.float32))
    return tensors


def test_experts_are_stacked_padded_and_rescaled(tmp_path):
    model_dir = models.example_model_dir("tiny-moe")
    index = ModuleIndex.from_model_dir(model_dir)
    tensors = expert_factors(index, {"gate_proj": "gate_proj"}, ranks={1: 2})
    rng = np.random.default_rng(1)
    for block in range(index.list_length("model.layers")):
        key = f"{PREFIX}model.layers.{block}.mlp.shared_expert.gate_proj"
        tensors[f"{key}.lora_A.weight"] = mx.array(rng.normal(size=(4, 64)).astype(np.float32))
        tensors[f"{key}.lora_B.weight"] = mx.array(rng.normal(size=(128, 4)).astype(np.float32))
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["gate_proj"], "rank_pattern": {"experts.1.gate_proj": 2}}
    write_peft(tmp_path / "peft", config, tensors)

    result = import_peft(tmp_path / "peft", str(model_dir), need_model=True)
    assert any("switch-LoRA of rank 4" in f.message for f in result.findings)
    assert not [f for f in result.findings if f.lossy]
    write_imported_adapters(result, tmp_path / "peft", tmp_path / "ours")
    ours = mx.load(str(tmp_path / "ours" / "adapters.safetensors"))
    entries = {e.path: e for e in result.plan.entries}
    path = "model.layers.1.mlp.switch_mlp.gate_proj"
    delta = lora_delta("switch-lora", ours[f"{path}.lora_a"], ours[f"{path}.lora_b"], entries[path].scale)
    for expert in range(4):
        key = f"{PREFIX}model.layers.1.mlp.experts.{expert}.gate_proj"
        r = 2 if expert == 1 else 4
        want = (8 / r) * (tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"])
        np.testing.assert_allclose(np.array(delta[expert]), np.array(want), rtol=1e-5, atol=1e-5)
    shared = "model.layers.1.mlp.shared_expert.gate_proj"
    key = f"{PREFIX}{shared}"
    want = 2.0 * (tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"])
    got = lora_delta("lora", ours[f"{shared}.lora_a"], ours[f"{shared}.lora_b"], entries[shared].scale)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)


def test_mixtral_expert_names_round_trip(tmp_path):
    model_dir = models.write(tmp_path / "mixtral", "mixtral", with_tokenizer=False)
    index = ModuleIndex.from_model_dir(model_dir)
    tensors = expert_factors(index, {"w1": "gate_proj", "w3": "up_proj"}, ranks={})
    write_peft(tmp_path / "peft", {"r": 4, "lora_alpha": 16, "target_modules": ["w1", "w3"]}, tensors)
    result = import_peft(tmp_path / "peft", str(model_dir), need_model=True)
    assert not result.translation.explicit
    assert "switch_mlp.gate_proj: lora" in result.text and "switch_mlp.up_proj: lora" in result.text
    write_imported_adapters(result, tmp_path / "peft", tmp_path / "ours")
    config, _ = export_peft(str(model_dir), tmp_path / "ours", tmp_path / "back")
    assert sorted(config["target_modules"]) == ["w1", "w3"]
    back = mx.load(str(tmp_path / "back" / "adapter_model.safetensors"))
    assert sorted(back) == sorted(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(np.array(back[key]), np.array(value))


def test_weights_for_other_modules_are_refused(tmp_path):
    from adapterspec.errors import UserError

    model_dir = models.example_model_dir("tiny-llama")
    tensors = {
        f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight": mx.zeros((4, 64)),
        f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight": mx.zeros((64, 4)),
        f"{PREFIX}model.layers.0.self_attn.k_proj.lora_A.weight": mx.zeros((4, 64)),
    }
    write_peft(
        tmp_path / "peft", {"r": 4, "lora_alpha": 8, "target_modules": ["model.layers.0.self_attn.q_proj"]}, tensors
    )
    result = import_peft(tmp_path / "peft", str(model_dir), need_model=True)
    with pytest.raises(UserError, match="k_proj"):
        write_imported_adapters(result, tmp_path / "peft", tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def test_wrong_shapes_are_refused(tmp_path):
    from adapterspec.errors import UserError

    model_dir = models.example_model_dir("tiny-llama")
    tensors = {f"{PREFIX}model.layers.{b}.self_attn.q_proj.lora_A.weight": mx.zeros((4, 32)) for b in range(4)}
    tensors.update({f"{PREFIX}model.layers.{b}.self_attn.q_proj.lora_B.weight": mx.zeros((64, 4)) for b in range(4)})
    write_peft(tmp_path / "peft", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}, tensors)
    result = import_peft(tmp_path / "peft", str(model_dir), need_model=True)
    with pytest.raises(UserError, match=r"shape \(4, 32\), expected \(4, 64\)"):
        write_imported_adapters(result, tmp_path / "peft", tmp_path / "ours")


def test_export_config_is_short_and_exact():
    from adapterspec.interop.peft_export import peft_config
    from adapterspec.language.lint import parse_spec
    from adapterspec.model.plan import make_plan

    index = ModuleIndex.from_model_dir(models.example_model_dir("tiny-llama"))
    spec = parse_spec(
        "layers[-2:].self_attn.<q,v>_proj: lora(r=4, alpha=8)\nlayers[3].self_attn.v_proj: lora(r=2, alpha=8)\n"
        "/lm_head: full\n"
    )
    config, _ = peft_config(make_plan(spec, index), index)
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["layers_to_transform"] == [2, 3] and config["layers_pattern"] == "layers"
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    assert config["rank_pattern"] == {"model\\.layers\\.3\\.self_attn\\.v_proj": 2}
    assert config["alpha_pattern"] == {} and config["modules_to_save"] == ["lm_head"]


def test_export_refuses_mixed_lora_and_dora():
    from adapterspec.errors import UserError
    from adapterspec.interop.peft_export import peft_config
    from adapterspec.language.lint import parse_spec
    from adapterspec.model.plan import make_plan

    index = ModuleIndex.from_model_dir(models.example_model_dir("tiny-llama"))
    plan = make_plan(parse_spec("q_proj: lora\nv_proj: dora\n"), index)
    with pytest.raises(UserError, match="mixes lora and dora"):
        peft_config(plan, index)


def test_export_refuses_switch_dora_with_the_reason(tmp_path, capsys):
    from adapterspec.cli import main
    from adapterspec.errors import UserError
    from adapterspec.interop.peft_export import peft_config
    from adapterspec.language.lint import parse_spec
    from adapterspec.model.plan import make_plan

    index = ModuleIndex.from_model_dir(models.example_model_dir("tiny-moe"))
    plan = make_plan(parse_spec("layers[*].mlp.switch_mlp.*: dora(r=2)\n"), index)
    assert plan.ok and {e.adapter for e in plan.entries} == {"switch-dora"}
    with pytest.raises(UserError, match="switch-dora adapter \\(DoRA on experts\\), which PEFT has no equivalent"):
        peft_config(plan, index)

    from adapterspec.adapters.install import apply
    from adapterspec.adapters.loading import load_model
    from adapterspec.adapters.weights import save_adapters

    model_dir = models.example_model_dir("tiny-moe")
    model = load_model(model_dir)[0]
    save_adapters(model, apply(model, "layers[*].mlp.switch_mlp.*: dora(r=2)\n"), tmp_path / "ours")
    assert main(["export", "peft", str(model_dir), str(tmp_path / "ours"), "-o", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "switch-dora" in err and "use_dora" in err and "Traceback" not in err
    assert not (tmp_path / "p").exists()


def test_import_of_peft_dora_on_experts_stays_lossy():
    from adapterspec.interop.peft_import import translate

    index = ModuleIndex.from_model_dir(models.example_model_dir("tiny-moe"))
    lossy = translate({"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["gate_proj"]}, index).lossy
    messages = [f.message for f in lossy]
    assert any("DoRA on the experts" in m and "switch-DoRA" in m for m in messages), messages
