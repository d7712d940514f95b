"""mlx-lm configs (adapter_config.json and mlx_lm.lora YAML) → specs whose plan equals what mlx-lm itself adapts."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

import models  # noqa: E402

from adapterspec.cli import main  # noqa: E402
from adapterspec.errors import UserError  # noqa: E402
from adapterspec.interop.mlxlm_import import read_mlx_lm_config, translate  # noqa: E402
from adapterspec.language.lint import parse_spec  # noqa: E402
from adapterspec.model.index import ModuleIndex  # noqa: E402
from adapterspec.model.plan import make_plan  # noqa: E402

CASES = {
    "defaults": {},
    "keys-last-two": {
        "num_layers": 2,
        "lora_parameters": {
            "rank": 4,
            "scale": 10.0,
            "dropout": 0.0,
            "keys": ["self_attn.q_proj", "mlp.switch_mlp.up_proj", "lm_head"],
        },
    },
    "all-blocks": {"num_layers": -1, "lora_parameters": {"rank": 2, "scale": 5.0, "dropout": 0.05}},
    "zero-layers": {
        "num_layers": 0,
        "lora_parameters": {"rank": 2, "scale": 5.0, "dropout": 0.0, "keys": ["self_attn.v_proj"]},
    },
    "too-many-layers": {
        "num_layers": 99,
        "lora_parameters": {"rank": 2, "scale": 5.0, "dropout": 0.0, "keys": ["self_attn.k_proj", "mlp.gate"]},
    },
    "dora": {
        "fine_tune_type": "dora",
        "num_layers": 1,
        "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "self_attn.o_proj"]},
    },
}


def mlx_lm_adapted(model_name: str, config: dict) -> dict:
    """What mlx-lm's own linear_to_lora_layers builds: path → (r, scale, dropout)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = models.load(models.example_model_dir(model_name))
    fine_tune_type = config.get("fine_tune_type", "lora")
    parameters = config.get("lora_parameters", {"rank": 8, "scale": 20.0, "dropout": 0.0})
    linear_to_lora_layers(model, config.get("num_layers", 16), parameters, use_dora=fine_tune_type == "dora")
    out = {}
    for path, module in model.named_modules():
        if hasattr(module, "lora_a"):
            dropout = round(1.0 - module.dropout._p_1, 9)  # mlx's Dropout keeps 1 - p
            out[path] = (module.lora_a.shape[1], module.scale, dropout)  # r is axis 1 of every lora_a layout
    return out


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-moe"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_equals_mlx_lm(model_name, case):
    config = CASES[case]
    if case == "dora" and model_name == "tiny-moe":
        config = {**config, "lora_parameters": {**config["lora_parameters"], "keys": ["self_attn.q_proj"]}}
    index = ModuleIndex.from_model_dir(models.example_model_dir(model_name))
    text, _ = translate(config, index, model=model_name)
    plan = make_plan(parse_spec(text), index)
    assert plan.ok, text
    got = {e.path: (e.r, e.scale, e.dropout) for e in plan.entries}
    assert got == mlx_lm_adapted(model_name, config), text


def test_full_fine_tune_trains_the_last_blocks():
    index = ModuleIndex.from_model_dir(models.example_model_dir("tiny-llama"))
    text, _ = translate({"fine_tune_type": "full", "num_layers": 2}, index)
    assert "/model.layers[-2:]: full" in text
    plan = make_plan(parse_spec(text), index)
    assert {e.path.split(".")[2] for e in plan.entries} == {"2", "3"}


def test_yaml_config(tmp_path):
    (tmp_path / "lora.yaml").write_text(
        "model: some/model\nfine_tune_type: lora\nnum_layers: 2\nlearning_rate: 1e-5\n"
        "lora_parameters:\n  keys: [self_attn.q_proj]\n  rank: 4\n  scale: 1e1\n  dropout: 0.0\n"
    )
    config = read_mlx_lm_config(tmp_path / "lora.yaml")
    assert config["lora_parameters"]["scale"] == 10.0 and config["learning_rate"] == 1e-5
    assert main(["import", "mlx-lm", str(tmp_path / "lora.yaml"), "-o", str(tmp_path / "s.aspec")]) == 0
    assert "layers[-2:].self_attn.q_proj: lora(r=4, scale=10.0, dropout=0.0)" in (tmp_path / "s.aspec").read_text()


def test_adapter_directory_with_model(tmp_path, capsys):
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    (adapters / "adapter_config.json").write_text(
        json.dumps(
            {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}}
        )
    )
    assert main(["import", "mlx-lm", str(adapters), "--model", str(models.example_model_dir("tiny-llama"))]) == 0
    assert "/model.layers[-2:]: lora(r=4, scale=10.0, dropout=0.0)" in capsys.readouterr().out


def test_missing_scale_is_reported_like_mlx_lm():
    with pytest.raises(UserError, match="scale.*'alpha'"):
        translate({"lora_parameters": {"rank": 4, "alpha": 16, "dropout": 0.0}})


def test_unconvertible_key_is_lossy():
    index = ModuleIndex.from_model_dir(models.example_model_dir("tiny-llama"))
    _, findings = translate(
        {
            "num_layers": 1,
            "lora_parameters": {
                "rank": 4,
                "scale": 1.0,
                "dropout": 0.0,
                "keys": ["self_attn.q_proj", "input_layernorm"],
            },
        },
        index,
    )
    assert any(f.lossy and "input_layernorm" in f.message for f in findings)
