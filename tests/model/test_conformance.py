"""Conformance with mlx-lm: every row of a table of mlx-lm adapter configs, translated to a spec, adapts
exactly the modules `linear_to_lora_layers` adapts, with the same trainable parameter count; and the
plan's own mlx-lm config, fed back to mlx-lm, adapts that same set again."""

from __future__ import annotations

import itertools
import json

import models as tiny
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner import dora as mlxlm_dora
from mlx_lm.tuner import lora as mlxlm_lora
from mlx_lm.tuner.utils import linear_to_lora_layers

from adapterspec.adapters.install import apply
from adapterspec.language.lint import parse_spec
from adapterspec.model.index import ModuleIndex
from adapterspec.model.mlxlm import mlx_lm_config, spec_from_mlx_lm
from adapterspec.model.plan import make_plan

BLOCKS = 3
MLX_LM_ADAPTERS = (
    mlxlm_lora.LoRALinear, mlxlm_lora.LoRASwitchLinear, mlxlm_lora.LoRAEmbedding,
    mlxlm_dora.DoRALinear, mlxlm_dora.DoRAEmbedding,
)  # fmt: skip

# arch → (quantized, the key lists of the table: attention, mlp/experts, top level)
MODELS = {
    "llama": (False, ["self_attn.q_proj", "self_attn.v_proj"], ["mlp.down_proj", "mlp.gate_proj"]),
    "llama-q4": (True, ["self_attn.k_proj"], ["mlp.up_proj"]),
    "mixtral": (False, ["self_attn.q_proj", "self_attn.v_proj"],
                ["block_sparse_moe.gate", "block_sparse_moe.switch_mlp.up_proj"]),
    "phi3": (False, ["self_attn.qkv_proj"], ["mlp.gate_up_proj"]),
    "gemma": (False, ["self_attn.q_proj", "self_attn.v_proj"], ["mlp.down_proj"]),
}  # fmt: skip


def key_table(arch):
    _, attention, mlp = MODELS[arch]
    return {
        "all": None,
        "attention": attention,
        "mlp": mlp,
        "top-level": ["lm_head", "model.embed_tokens"],
        "attention-and-top": attention + ["model.embed_tokens"],
        "nothing": ["does_not.exist", "self_attn.nope"],
        "some-unknown": [attention[0], "mlp.nope"],
    }


NUM_LAYERS = {"1": 1, "N-1": BLOCKS - 1, "N": BLOCKS, "0": 0, "-1": -1, "N+2": BLOCKS + 2}
# rank, scale, dropout: varied along the table rather than multiplied into it
HYPER = [(4, 20.0, 0.0), (2, 0.5, 0.1), (8, 1e-3, 0.0), (1, 7.0, 0.05)]
CASES = [
    pytest.param(arch, keys, layers, kind, HYPER[i % len(HYPER)], id=f"{arch}-{keys}-layers{layers}-{kind}")
    for i, (arch, keys, layers, kind) in enumerate(
        itertools.product(MODELS, key_table("llama"), NUM_LAYERS, ("lora", "dora"))
    )
]


def build(arch):
    quantized = MODELS[arch][0]
    model_type = arch.split("-")[0]
    return tiny.build(model_type, quantization=tiny.Q4 if quantized else None, num_hidden_layers=BLOCKS)[0]


@pytest.fixture(scope="module")
def indexes():
    return {arch: ModuleIndex.from_module(build(arch)) for arch in MODELS}


def mlx_lm_result(arch, num_layers, lora_parameters, kind):
    """(adapted module paths, trainable parameter count) after mlx-lm's own call; None when mlx-lm refuses.

    The count is None where mlx-lm sizes an adapter wrongly: its DoRAEmbedding reads the packed width
    of a QuantizedEmbedding (lora_b is (r, dims·bits/32) and its forward pass fails), so there its
    count is no reference; ours follows the logical width, as for every other quantized layer.
    """
    model = build(arch)
    model.freeze()
    try:
        linear_to_lora_layers(model, num_layers, dict(lora_parameters), use_dora=kind == "dora")
    except ValueError:
        return None
    adapters = {path: m for path, m in model.named_modules() if isinstance(m, MLX_LM_ADAPTERS)}
    packed = any(
        isinstance(m, mlxlm_dora.DoRAEmbedding) and type(m.embedding).__name__ == "QuantizedEmbedding"
        for m in adapters.values()
    )
    return set(adapters), None if packed else trainable_count(model)


def trainable_count(model):
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


@pytest.mark.parametrize("arch, keys, layers, kind, hyper", CASES)
def test_translated_config_adapts_what_mlx_lm_adapts(indexes, arch, keys, layers, kind, hyper):
    rank, scale, dropout = hyper
    parameters = {"rank": rank, "scale": scale, "dropout": dropout, "keys": key_table(arch)[keys]}
    num_layers = NUM_LAYERS[layers]
    index = indexes[arch]
    expected = mlx_lm_result(arch, num_layers, parameters, kind)

    text, notes = spec_from_mlx_lm(parameters, num_layers, kind, index)
    plan = make_plan(parse_spec(text), index)
    if expected is None:  # mlx-lm has no DoRA for experts; adapterspec plans switch-dora and says mlx-lm cannot
        assert plan.ok and "switch-dora" in {e.adapter for e in plan.entries}
        assert any("mlx-lm refuses DoRA on experts" in note for note in notes), notes
        fit = mlx_lm_config(plan, index)
        assert not fit.compatible and any("switch-dora" in reason for reason in fit.reasons)
        return
    paths, count = expected
    assert plan.ok, [d.message for d in plan.diagnostics]
    assert {e.path for e in plan.entries} == paths
    assert count is None or plan.trainable_parameters == count
    assert {(e.r, e.scale, e.dropout) for e in plan.entries} <= {(rank, scale, dropout)}
    if keys == "nothing":
        assert not paths and len(notes) == 2

    model = build(arch)
    apply(model, plan)
    assert trainable_count(model) == plan.trainable_parameters

    fit = mlx_lm_config(plan, index)
    if not paths:
        assert not fit.compatible
        return
    assert fit.compatible, fit.reasons
    config = json.loads(json.dumps(fit.config))  # as adapter_config.json stores it
    assert config["fine_tune_type"] == kind
    again = mlx_lm_result(arch, config["num_layers"], config["lora_parameters"], config["fine_tune_type"])
    assert again == expected


def test_the_table_covers_adapters_of_every_kind(indexes):
    """Guard against a table that only ever compares empty sets."""
    seen = set()
    for arch in MODELS:
        for keys in key_table(arch).values():
            for kind in ("lora", "dora"):
                text, _ = spec_from_mlx_lm({"rank": 4, "scale": 1.0, "dropout": 0.0, "keys": keys}, 0, kind,
                                           indexes[arch])  # fmt: skip
                plan = make_plan(parse_spec(text), indexes[arch])
                if plan.ok:
                    seen |= {e.adapter for e in plan.entries}
    assert seen == {"lora", "switch-lora", "embedding-lora", "dora", "dora-embedding", "switch-dora"}


def test_keys_naming_modules_mlx_lm_cannot_convert_are_noted(indexes):
    parameters = {"rank": 4, "scale": 1.0, "dropout": 0.0, "keys": ["self_attn", "input_layernorm", "self_attn.q_proj"]}
    model = build("llama")
    with pytest.raises(ValueError):
        linear_to_lora_layers(model, 2, dict(parameters))
    text, notes = spec_from_mlx_lm(parameters, 2, "lora", indexes["llama"])
    assert len(notes) == 2 and all("mlx-lm fails on it" in n for n in notes)
    assert {e.path for e in make_plan(parse_spec(text), indexes["llama"]).entries} == {
        f"model.layers.{n}.self_attn.q_proj" for n in (1, 2)
    }
