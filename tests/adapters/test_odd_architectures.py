"""Adapters on mlx-lm architectures that read or write a module's `.weight` themselves, return a list from a
Linear, skip nn.Module's state, or normalise their head at call time. Real mlx-lm models, built tiny."""

from __future__ import annotations

import mlx.core as mx
import models as tiny
import pytest

from adapterspec.adapters.install import apply, from_base, has_adapters
from adapterspec.errors import UserError

SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "vocab_size": 64,
}
CONFIGS = {
    "seed_oss": {**SMALL, "model_type": "seed_oss", "head_dim": 8, "max_position_embeddings": 64,
                 "tie_word_embeddings": True},
    "afm7": {"model_type": "afm7", "hidden_dim": 32, "num_heads": 4, "num_kv_heads": 2, "num_kv_reuse_layers": 1,
             "num_layers": 3, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": 64},
    "recurrent_gemma": {**SMALL, "model_type": "recurrent_gemma", "attention_bias": False, "attention_window_size": 16,
                        "block_types": ["recurrent", "attention"], "conv1d_width": 4, "logits_soft_cap": 30.0,
                        "lru_width": 32},
    "baichuan_m1": {**SMALL, "model_type": "baichuan_m1", "conv_window": 2, "sliding_window": 2,
                    "sliding_window_layers": []},
}  # fmt: skip
TOKENS = mx.array([[1, 5, 7, 3, 9, 2]])


def build(arch: str):
    return tiny.builder.build_model(dict(CONFIGS[arch]))


def randomize_lora_b(model) -> None:
    from mlx.utils import tree_flatten, tree_unflatten

    mx.random.seed(3)
    names = [(n, v) for n, v in tree_flatten(model.parameters()) if n.endswith("lora_b")]
    model.update(tree_unflatten([(n, 0.05 * mx.random.normal(v.shape)) for n, v in names]))


def test_adapters_expose_the_weight():
    import mlx.nn as nn

    linear = nn.Linear(8, 4)
    lora = from_base("lora", linear, r=2)
    assert lora.weight is linear.weight and "weight" not in lora
    lora.weight = mx.zeros((4, 8))  # model code that writes `.weight` writes the base's
    assert "weight" not in lora and not mx.any(linear.weight).item()
    embedding = nn.Embedding(10, 4)
    adapter = from_base("embedding-lora", embedding, r=2)
    adapter.lora_b = mx.ones((2, 4))
    expected = embedding.weight + adapter.scale * (adapter.lora_a @ adapter.lora_b)
    assert mx.allclose(adapter.weight, expected).item()
    # the tied head computed from `.weight` is the adapter's own as_linear
    x = mx.random.normal((3, 4))
    assert mx.allclose(x @ adapter.weight.T, adapter.as_linear(x), atol=1e-5).item()


def test_seed_oss_tied_head_reads_the_embedding_weight():
    model, _ = build("seed_oss")
    assert "lm_head" not in model
    apply(model, "**@linear: lora(r=4)\n**@embedding: lora(r=2)\n")
    base = build("seed_oss")[0](TOKENS)
    randomize_lora_b(model)
    out = model(TOKENS)  # was AttributeError: 'LoRAEmbedding' object has no attribute 'weight'
    assert out.shape == base.shape and not mx.allclose(out, base).item()


def test_afm7_fused_linear_is_refused_with_the_reason(tmp_path):
    from adapterspec.language.diagnostics import SpecError
    from adapterspec.model.index import ModuleIndex
    from adapterspec.model.plan import make_plan, parse_spec

    model, config = build("afm7")
    with pytest.raises(SpecError) as caught:
        apply(model, "**@linear: lora(r=4)\n")
    (diagnostic,) = caught.value.diagnostics
    assert diagnostic.code == "AS315" and "qkv_proj' is a FusedLinear" in diagnostic.message
    assert "FusedLoRALinear" in diagnostic.message and "**@FusedLinear: none" in diagnostic.help
    assert not has_adapters(model)  # nothing was changed
    # the model directory says the same before anything is built
    directory = ModuleIndex.from_model_dir(tiny.save(tmp_path / "afm7", model, config, with_tokenizer=False))
    assert directory["model.layers.0.self_attn.qkv_proj"].cls == "FusedLinear"
    assert [d.code for d in make_plan(parse_spec("**@linear: lora(r=4)\n"), directory).diagnostics] == ["AS315"]
    # without the fused projections, the rest takes adapters
    apply(model, "**@linear: lora(r=4)\n**@FusedLinear: none\n")
    randomize_lora_b(model)
    model(TOKENS)


def test_afm7_mlx_lm_counts_the_kv_reuse_blocks_last(tmp_path):
    """mlx-lm's afm7 `model.layers` is model.layers + model.kv_reuse_layers: its num_layers=1 means the kv-reuse
    block, so an adapter on the last of `layers` alone is no mlx-lm config, and one on both is num_layers=2."""
    from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters

    from adapterspec.adapters.weights import save_adapters

    model, config = build("afm7")
    directory = tiny.save(tmp_path / "afm7", model, config, with_tokenizer=False)
    plan = apply(model, "layers[-1:].mlp.*: lora(r=2)\n/model.kv_reuse_layers[*].mlp.*: lora(r=2)\n")
    randomize_lora_b(model)
    save_adapters(model, plan, tmp_path / "adapters")
    saved = (tmp_path / "adapters" / "adapter_config.json").read_text()
    assert '"num_layers": 2' in saved
    theirs = mlx_lm_load_adapters(tiny.load(directory)[0], str(tmp_path / "adapters"))
    assert mx.allclose(theirs(TOKENS), model(TOKENS), atol=1e-5).item()
    alone = apply(build("afm7")[0], "layers[-1:].mlp.*: lora(r=2)\n")
    from adapterspec.model.mlxlm import mlx_lm_config

    assert not mlx_lm_config(alone, alone.index).compatible


def test_recurrent_gemma_takes_adapters():
    model, _ = build("recurrent_gemma")
    apply(model, "**@linear: lora(r=4)\n")  # was: 'Model' object has no attribute '_no_grad' in freeze
    randomize_lora_b(model)
    assert has_adapters(model)
    model(TOKENS)


def test_baichuan_m1_fuse_refuses_the_normalised_head(tmp_path):
    from adapterspec.adapters.weights import save_adapters
    from adapterspec.fuse.plan import plan_fuse

    model, config = build("baichuan_m1")
    model_dir = tiny.save(tmp_path / "model", model, config, with_tokenizer=False)
    plan = apply(model, "**@linear: lora(r=4)\n")
    save_adapters(model, plan, tmp_path / "adapters")
    with pytest.raises(UserError, match=r"'lm_head'.*NormHead"):
        plan_fuse(model_dir, tmp_path / "adapters")
    # without the head, the fuse goes ahead
    model2, _ = build("baichuan_m1")
    plan = apply(model2, "**@linear: lora(r=4)\nlm_head: none\n")
    save_adapters(model2, plan, tmp_path / "adapters2")
    assert plan_fuse(model_dir, tmp_path / "adapters2").units
