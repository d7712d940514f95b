"""apply on real mlx-lm models: what becomes trainable, all-or-nothing on errors, no second apply,
and a freshly adapted model computes what its base computes."""

from __future__ import annotations

import mlx.core as mx
import models as tiny
import pytest
from mlx.utils import tree_flatten, tree_map

from adapterspec.adapters.install import apply, has_adapters
from adapterspec.language.diagnostics import SpecError
from adapterspec.language.lint import parse_spec
from adapterspec.model.index import ModuleIndex
from adapterspec.model.plan import make_plan

TOKENS = mx.array([[1, 5, 9, 2, 7, 3]])


def build(arch="llama", quantized=False):
    return tiny.build(arch, quantization=tiny.Q4 if quantized else None)[0]


def trainable_names(model) -> set[str]:
    return {name for name, _ in tree_flatten(model.trainable_parameters())}


def snapshot(model):
    """Everything apply could change: parameters (by identity and value), module classes, trainable names."""
    params = dict(tree_flatten(model.parameters()))
    return (
        {name: id(value) for name, value in params.items()},
        {name: value.tolist() if value.size < 64 else mx.sum(value).item() for name, value in params.items()},
        {path: type(module).__name__ for path, module in model.named_modules()},
        trainable_names(model),
    )


def randomize_adapters(model, seed=3):
    """Give every lora_b (and every other adapter parameter) random values, so adapters do something."""
    mx.random.seed(seed)
    model.update(tree_map(lambda v: 0.05 * mx.random.normal(v.shape), model.trainable_parameters()))


# ── what becomes trainable ───────────────────────────────────────────────────────────────


def test_apply_freezes_the_base_and_trains_exactly_the_adapters():
    model = build()
    assert "model.embed_tokens.weight" in trainable_names(model)
    plan = apply(model, "<q,v>_proj: lora(r=4)\n")
    expected = {f"{e.path}.{leaf}" for e in plan.entries for leaf in ("lora_a", "lora_b")}
    assert trainable_names(model) == expected
    assert len(plan.entries) == 2 * 4


def test_dora_trains_the_magnitude_too():
    model = build()
    plan = apply(model, "layers[0].mlp: dora(r=2)\nembed_tokens: dora(r=2)\n")
    expected = {f"{e.path}.{leaf}" for e in plan.entries for leaf in ("lora_a", "lora_b", "m")}
    assert trainable_names(model) == expected


def test_full_modules_train_their_own_parameters_and_nothing_else():
    model = build()
    plan = apply(model, "**.*norm: full\nlayers[-1].self_attn.o_proj: full\nq_proj: lora\n")
    full = {f"{e.path}.weight" for e in plan.entries if e.adapter == "full"}
    lora = {f"{e.path}.{leaf}" for e in plan.entries if e.adapter == "lora" for leaf in ("lora_a", "lora_b")}
    assert "model.norm.weight" in full and "model.layers.3.self_attn.o_proj.weight" in full
    assert trainable_names(model) == full | lora


def test_full_on_a_block_unfreezes_every_parameter_in_it():
    model = build()
    apply(model, "layers[1]: full\n")
    block = {n for n, _ in tree_flatten(model.model.layers[1].parameters())}
    assert trainable_names(model) == {f"model.layers.1.{n}" for n in block}


def test_quantized_base_stays_frozen_under_lora():
    model = build(quantized=True)
    plan = apply(model, "layers[0]: lora(r=2)\n")
    assert trainable_names(model) == {f"{e.path}.{leaf}" for e in plan.entries for leaf in ("lora_a", "lora_b")}
    assert type(model.model.layers[0].self_attn.q_proj.linear).__name__ == "QuantizedLinear"


def test_adapted_modules_are_replaced_and_others_kept():
    model = build("qwen2_moe")
    before = dict(model.named_modules())
    apply(model, "switch_mlp.*: lora(r=2)\nembed_tokens: lora(r=2)\nq_proj: dora(r=2)\n")
    after = dict(model.named_modules())
    layer = "model.layers.0"
    assert type(after[f"{layer}.mlp.switch_mlp.up_proj"]).__name__ == "LoRASwitchLinear"
    assert after[f"{layer}.mlp.switch_mlp.up_proj.linear"] is before[f"{layer}.mlp.switch_mlp.up_proj"]
    assert type(after["model.embed_tokens"]).__name__ == "LoRAEmbedding"
    assert type(after[f"{layer}.self_attn.q_proj"]).__name__ == "DoRALinear"
    assert after[f"{layer}.self_attn.k_proj"] is before[f"{layer}.self_attn.k_proj"]


def test_apply_takes_text_a_spec_or_a_plan():
    text = "q_proj: lora(r=2)\n"
    from_text = apply(build(), text)
    from_spec = apply(build(), parse_spec(text))
    model = build()
    given = make_plan(parse_spec(text), ModuleIndex.from_module(model))
    assert apply(model, given) is given
    assert [e.path for e in from_text.entries] == [e.path for e in from_spec.entries] == [e.path for e in given.entries]
    assert has_adapters(model)


# ── all or nothing ───────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "text, code",
    [
        ("q_proj: lora\n**.*norm: lora\n", "AS302"),
        ("q_proj: lora\nlayers[9]: lora\n", "AS305"),
        ("q_proj: lora\nq_prj: lora\n", "AS301"),
        ("q_proj: lora\nembed_tokens@linear: lora\n", "AS304"),
    ],
)
def test_a_spec_with_errors_leaves_the_model_unchanged(text, code):
    model = build()
    before = snapshot(model)
    with pytest.raises(SpecError) as raised:
        apply(model, text)
    assert code in [d.code for d in raised.value.diagnostics]
    assert snapshot(model) == before
    assert not has_adapters(model)


def test_full_on_quantized_layers_leaves_the_model_unchanged():
    model = build(quantized=True)
    before = snapshot(model)
    with pytest.raises(SpecError):
        apply(model, "**.*norm: full\nlayers[0]: full\n")
    assert snapshot(model) == before


def test_a_spec_error_beside_dora_on_experts_leaves_the_model_unchanged():
    model = build("mixtral")
    before = snapshot(model)
    with pytest.raises(SpecError):
        apply(model, "q_proj: lora\nlayers[*]: dora\nlayers[99]: lora\n")
    assert snapshot(model) == before


def test_a_plan_for_another_model_leaves_the_model_unchanged():
    bigger = tiny.build("llama", num_hidden_layers=6)[0]
    plan = make_plan(parse_spec("layers[*].self_attn.q_proj: lora\n"), ModuleIndex.from_module(bigger))
    model = build()
    before = snapshot(model)
    with pytest.raises((KeyError, IndexError)):
        apply(model, plan)
    assert snapshot(model) == before


def test_apply_on_an_adapted_model_raises_and_keeps_the_first_adapters():
    model = build()
    apply(model, "q_proj: lora(r=4)\n")
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has adapters"):
        apply(model, "v_proj: lora(r=2)\n")
    assert snapshot(model) == before


def test_apply_on_a_model_adapted_by_mlx_lm_raises():
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = build()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]})
    with pytest.raises(ValueError, match="already has adapters"):
        apply(model, "v_proj: lora\n")


def test_full_alone_is_no_adapter_so_a_second_apply_is_allowed():
    model = build()
    apply(model, "**.*norm: full\n")
    assert not has_adapters(model)
    apply(model, "q_proj: lora(r=2)\n")
    assert has_adapters(model)


# ── outputs ──────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "arch, quantized, text",
    [
        ("llama", False, "layers[*]: lora(r=4)\nembed_tokens: lora(r=2)\n"),
        ("llama", False, "<q,k,v,o>_proj: dora(r=4)\nembed_tokens: dora(r=2)\n"),
        ("llama", True, "**: lora(r=4)\n"),
        ("qwen2_moe", False, "**: lora(r=2)\n**.*norm: full\n"),
        ("mixtral", True, "switch_mlp.*: lora(r=2)\nlayers[*]@linear: dora(r=2)\n"),
        ("gemma", False, "embed_tokens: lora(r=4)\nlayers[-1]: dora(r=2)\n"),
        ("phi3", False, "layers[*]: lora(r=4)\n"),
    ],
)
def test_fresh_adapters_leave_the_outputs_unchanged(arch, quantized, text):
    model = build(arch, quantized)
    base = model(TOKENS)
    apply(model, text)
    assert mx.allclose(model(TOKENS), base, atol=1e-5).item()
    randomize_adapters(model)
    assert not mx.allclose(model(TOKENS), base, atol=1e-3).item()  # the adapters really are in the path


def test_a_tied_embedding_adapter_changes_the_output_head():
    model = build("gemma")
    apply(model, "embed_tokens: lora(r=4)\n")
    hidden = model.model.embed_tokens.embedding(TOKENS)
    base_head = model.model.embed_tokens.embedding.as_linear(hidden)
    randomize_adapters(model)
    assert not mx.allclose(model.model.embed_tokens.as_linear(hidden), base_head, atol=1e-3).item()
