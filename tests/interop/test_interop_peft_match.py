"""adapterspec's re-implementation of PEFT's module matching agrees with PEFT's own functions, name by name."""

from __future__ import annotations

import itertools

import pytest

peft = pytest.importorskip("peft")

from peft.tuners.tuners_utils import check_target_module_exists  # noqa: E402
from peft.utils.other import get_pattern_key  # noqa: E402

from adapterspec.interop import peft_match  # noqa: E402

NAMES = [
    "lm_head",
    "model",
    "model.embed_tokens",
    "model.norm",
    "model.layers",
    "model.layers.0",
    "model.layers.0.self_attn",
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.10.self_attn.q_proj",
    "model.layers.2.mlp.down_proj",
    "model.layers.1.mlp.experts.0.gate_proj",
    "model.layers.1.mlp.experts.3.w1",
    "model.layers.1.mlp.shared_expert.gate_proj",
    "model.layers.0.input_layernorm",
    "vision_tower.blocks.1.attn.q_proj",
    "language_model.model.layers.3.self_attn.q_proj",
    "model.layers.0.self_attn.q_proj_extra",
    "model.layers.0.self_attn.xq_proj",
    "q_proj",
    "h.4.attn.c_attn",
]

TARGET_CONFIGS = [
    dict(target_modules=["q_proj"]),
    dict(target_modules=["q_proj", "v_proj", "lm_head"]),
    dict(target_modules=["self_attn.q_proj", "mlp.experts.0.gate_proj"]),
    dict(target_modules=["model.layers.1.self_attn.q_proj"]),
    dict(target_modules=r".*\.layers\.\d+\.self_attn\.(q|v)_proj"),
    dict(target_modules=r"model.*proj"),
    dict(target_modules=["q_proj", "gate_proj"], layers_to_transform=[1, 10], layers_pattern="layers"),
    dict(target_modules=["q_proj", "gate_proj"], layers_to_transform=[1, 4], layers_pattern=["blocks", "h"]),
    dict(target_modules=["q_proj", "c_attn"], layers_to_transform=[1, 4]),
    dict(target_modules=["q_proj", "w1"], layers_to_transform=1, layers_pattern="layers"),
    dict(target_modules=["model.layers.1.self_attn.q_proj"], layers_to_transform=[0], layers_pattern="layers"),
    dict(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.q_proj", "v_proj"]),
    dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.1\..*"),
    dict(target_modules=["q_proj", "embed_tokens", "lm_head"], modules_to_save=["lm_head", "self_attn"]),
]


def lora_config(config: dict):
    return peft.LoraConfig(**config)


@pytest.mark.parametrize("config", TARGET_CONFIGS, ids=lambda c: "-".join(f"{k}" for k in c))
def test_targets_agree_with_peft(config):
    peft_config = lora_config(config)
    # PEFT stores lists as sets; adapterspec reads the saved config, where they are lists again.
    for name in NAMES:
        assert peft_match.is_targeted(config, name) == bool(check_target_module_exists(peft_config, name)), name


PATTERN_KEYS = [
    ["q_proj"],
    ["self_attn.q_proj", "q_proj"],
    ["q_proj", "self_attn.q_proj"],
    ["model.layers.1.self_attn.q_proj"],
    ["^model.layers.0.self_attn.q_proj"],
    [r"layers\.\d\.self_attn\.q_proj"],
    ["proj"],
    ["layers.1", "experts.0.gate_proj"],
    [r".*_proj"],
    ["gate_proj", "w1"],
]


@pytest.mark.parametrize("keys", PATTERN_KEYS, ids=lambda k: "|".join(k))
def test_pattern_keys_agree_with_peft(keys):
    for name in NAMES:
        expected = get_pattern_key(keys, name)
        got = peft_match.pattern_key(keys, name)
        assert (got if got is not None else name) == expected, name


def test_rank_and_alpha_use_first_match_of_each_pattern():
    config = {
        "r": 8,
        "lora_alpha": 16,
        "rank_pattern": {"model.layers.0.self_attn.q_proj": 2, "q_proj": 4},
        "alpha_pattern": {"q_proj": 3, "model.layers.0.self_attn.q_proj": 5},
    }
    assert peft_match.rank_and_alpha(config, "model.layers.0.self_attn.q_proj") == (2, 3.0)
    assert peft_match.rank_and_alpha(config, "model.layers.1.self_attn.q_proj") == (4, 3.0)
    assert peft_match.rank_and_alpha(config, "model.layers.1.self_attn.v_proj") == (8, 16.0)


@pytest.mark.parametrize("saved", [["lm_head"], ["head"], ["self_attn"], ["norm", "embed_tokens"]])
def test_modules_to_save_is_a_plain_suffix(saved):
    for name in NAMES:
        assert peft_match.is_saved({"modules_to_save": saved}, name) == any(name.endswith(s) for s in saved)


def test_all_linear_leaves_out_the_output_head():
    config = peft_match.expand_all_linear({"target_modules": "ALL-LINEAR"}, ["a.q_proj", "lm_head"], "lm_head")
    assert config["target_modules"] == {"a.q_proj"}
    assert all(peft_match.is_targeted(config, n) == (n == "a.q_proj") for n in itertools.chain(NAMES, ["a.q_proj"]))
