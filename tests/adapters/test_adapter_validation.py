"""Broken adapter directories end in a UserError naming the file and the field or tensor, and change nothing."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import models as tiny
import pytest

from adapterspec.adapters.install import apply, has_adapters
from adapterspec.adapters.weights import load_adapters, read_weights, save_adapters
from adapterspec.errors import UserError
from adapterspec.model.adapter_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config

SPEC = "<q,v>_proj: lora(r=4)\n"


@pytest.fixture
def saved(tmp_path):
    model = tiny.build("llama")[0]
    plan = apply(model, SPEC)
    return save_adapters(model, plan, tmp_path / "a")


def edit_config(path, change):
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    config = change(config)
    (path / ADAPTER_CONFIG).write_text(json.dumps(config))


def mlx_lm_only(config, **changes):
    config = {k: v for k, v in config.items() if k != "adapterspec"}
    parameters = dict(config["lora_parameters"], **changes.pop("lora_parameters", {}))
    return {**config, "lora_parameters": parameters, **changes}


def first_module(config, **changes):
    config["adapterspec"]["plan"]["modules"][0].update(changes)
    return config


BAD_CONFIGS = {
    "a-list": (lambda c: [], "not a JSON object"),
    "null": (lambda c: None, "null, not a JSON object"),
    "section-a-list": (lambda c: {**c, "adapterspec": []}, "adapterspec is a list"),
    "format-99": (lambda c: {**c, "adapterspec": {**c["adapterspec"], "format": 99}}, "adapterspec.format is 99"),
    "spec-a-number": (
        lambda c: {**c, "adapterspec": {**c["adapterspec"], "spec": 5}},
        "adapterspec.spec is the number",
    ),
    "plan-a-list": (lambda c: {**c, "adapterspec": {**c["adapterspec"], "plan": []}}, "adapterspec.plan is a list"),
    "rank-nan": (lambda c: first_module(c, r=math.nan), r"modules\[0\]\.r is the number NaN"),
    "scale-inf": (lambda c: first_module(c, scale=math.inf), r"modules\[0\]\.scale is the number Infinity"),
    "path-dotdot": (lambda c: first_module(c, path="../../x"), r"modules\[0\]\.path has '/'"),
    "kind-unknown": (lambda c: first_module(c, adapter="ia3"), r"modules\[0\]\.adapter is 'ia3'"),
    "other-rank": (
        lambda c: {**c, "adapterspec": {**c["adapterspec"], "spec": "adapterspec 1\n<q,v>_proj: lora(r=2)\n"}},
        "made for another model",
    ),
    # Ours and mlx-lm's keys side by side, one of them edited: mlx-lm and adapterspec would load two models.
    "mlx-lm-scale-edited-beside-ours": (
        lambda c: {**c, "lora_parameters": {**c["lora_parameters"], "scale": 8.0}},
        "lora_parameters.scale is 8.0 but its adapterspec plan says 20.0",
    ),
    "mlx-lm-num-layers-edited-beside-ours": (lambda c: {**c, "num_layers": 1}, "num_layers is 1 but"),
    "saved-plan-scale-edited": (lambda c: first_module(c, scale=8.0), "the saved plan gives .* scale 8, its spec 20"),
    "mlx-lm-num-layers-string": (lambda c: mlx_lm_only(c, num_layers="x"), "num_layers is a string"),
    "mlx-lm-ia3": (lambda c: mlx_lm_only(c, fine_tune_type="ia3"), "fine_tune_type 'ia3'"),
    "mlx-lm-no-lora-parameters": (
        lambda c: {k: v for k, v in mlx_lm_only(c).items() if k != "lora_parameters"},
        "lora_parameters is missing",
    ),
    "mlx-lm-rank-zero": (lambda c: mlx_lm_only(c, lora_parameters={"rank": 0}), "lora_parameters.rank is 0"),
    "mlx-lm-rank-string": (lambda c: mlx_lm_only(c, lora_parameters={"rank": "8"}), "rank is a string"),
    "mlx-lm-scale-nan": (lambda c: mlx_lm_only(c, lora_parameters={"scale": math.nan}), "scale is the number NaN"),
    "mlx-lm-key-newline": (
        lambda c: mlx_lm_only(c, lora_parameters={"keys": ["self_attn.q_proj\n/**: full"]}),
        r"keys\[0\] has a line break after 'self_attn.q_proj'",
    ),
}


@pytest.mark.parametrize("name", BAD_CONFIGS)
def test_a_damaged_config_is_refused_naming_the_file_and_field(saved, name):
    change, match = BAD_CONFIGS[name]
    edit_config(saved, change)
    model = tiny.build("llama")[0]
    with pytest.raises(UserError, match=match) as error:
        load_adapters(model, saved)
    assert ADAPTER_CONFIG in error.value.message
    assert "/**: full" not in error.value.message
    assert not has_adapters(model)


def test_a_deeply_nested_config_is_refused(saved):
    (saved / ADAPTER_CONFIG).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match="nested too deeply"):
        read_adapter_config(saved)


def test_a_config_that_is_a_directory_is_refused(saved):
    (saved / ADAPTER_CONFIG).unlink()
    (saved / ADAPTER_CONFIG).mkdir()
    with pytest.raises(UserError, match="a directory, not a JSON file"):
        read_adapter_config(saved)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_weights_holding_nan_or_inf_are_refused_naming_the_tensor(saved, value):
    weights = mx.load(str(saved / ADAPTER_WEIGHTS))
    name = "model.layers.0.self_attn.q_proj.lora_b"
    weights[name] = mx.full(weights[name].shape, value)
    mx.save_safetensors(str(saved / ADAPTER_WEIGHTS), weights)
    with pytest.raises(UserError, match=f"tensor '{name}' holds NaN or infinite values"):
        read_weights(saved / ADAPTER_WEIGHTS)
    model = tiny.build("llama")[0]
    with pytest.raises(UserError, match=name):
        load_adapters(model, saved)
    assert not has_adapters(model)


def test_a_truncated_weights_file_is_refused_naming_it(saved):
    data = (saved / ADAPTER_WEIGHTS).read_bytes()
    (saved / ADAPTER_WEIGHTS).write_bytes(data[:200])
    with pytest.raises(UserError, match=f"{ADAPTER_WEIGHTS}: not a readable safetensors file"):
        read_weights(saved / ADAPTER_WEIGHTS)
