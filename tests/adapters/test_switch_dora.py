"""switch-DoRA on the experts of real mlx-lm mixtures (mixtral, qwen2_moe; dense and 4-bit): the layer against a
float32 reference computed expert by expert from the base's dequantized weights, its gradients, and its fuse."""

from __future__ import annotations

import mlx.core as mx
import models as tiny
import pytest
from mlx.utils import tree_flatten

from adapterspec.adapters.basemodules import dense_weight
from adapterspec.adapters.install import apply, module_at
from adapterspec.adapters.switch_dora import DoRASwitchLinear

SCALE = 2.0
SWITCHES = {"mixtral": "model.layers.0.block_sparse_moe.switch_mlp", "qwen2_moe": "model.layers.0.mlp.switch_mlp"}
CASES = [(arch, q) for arch in SWITCHES for q in (False, True)]
IDS = [f"{arch}-{'4bit' if q else 'float32'}" for arch, q in CASES]


def rel_err(a, b) -> float:
    return (mx.linalg.norm((a - b).flatten()) / mx.linalg.norm(b.flatten())).item()


def adapted_switch(arch: str, quantized: bool, proj: str = "up_proj", dropout: float = 0.0):
    """A switch projection of a tiny mlx-lm model with switch-DoRA applied through a spec, as if trained."""
    model = tiny.build(arch, quantization=tiny.Q4 if quantized else None)[0]
    path = f"{SWITCHES[arch]}.{proj}"
    plan = apply(model, f"{path}: dora(r=4, scale={SCALE}, dropout={dropout})\n")
    assert [e.adapter for e in plan.entries] == ["switch-dora"]
    layer = module_at(model, path)
    assert isinstance(layer, DoRASwitchLinear)
    mx.random.seed(3)
    layer.lora_b = 0.05 * mx.random.normal(layer.lora_b.shape)
    layer.m = layer.m * (1 + 0.1 * mx.random.normal(layer.m.shape))
    return model, layer


def routed_inputs(layer, sort=False):
    mx.random.seed(4)
    x = mx.random.normal((3, 5, 1, 1, layer.lora_a.shape[-1]))
    indices = mx.random.randint(0, layer.num_experts, (3, 5, 2))
    if not sort:
        return x, indices, False
    flat = indices.flatten()
    order = mx.argsort(flat)
    return x.flatten(0, -3)[order // 2], flat[order], True


def reference(layer, x, indices):
    """y = (m_e / ‖W_e + s·B_e·A_e‖_row) ⊙ (x·(W_e + s·B_e·A_e)ᵀ) + bias_e for the expert e of each row, in float32."""
    weight = dense_weight(layer.linear).astype(mx.float32)
    out = 0
    for e in range(layer.num_experts):
        adapted = weight[e] + SCALE * (layer.lora_b[e] @ layer.lora_a[e])
        y = (layer.m[e] / mx.linalg.norm(adapted, axis=1)) * (x.astype(mx.float32) @ adapted.T)
        if "bias" in layer.linear:
            y = y + layer.linear.bias[e]
        out = out + (indices == e)[..., None, None] * y
    return out


@pytest.mark.parametrize("arch, quantized", CASES, ids=IDS)
@pytest.mark.parametrize("sort", [False, True], ids=["call", "sorted"])
def test_output_equals_the_per_expert_float32_reference(arch, quantized, sort):
    _, layer = adapted_switch(arch, quantized)
    x, indices, sorted_indices = routed_inputs(layer, sort)
    got = layer(x, indices, sorted_indices=sorted_indices)
    expected = reference(layer, x, indices)
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 2e-5
    plain = layer.linear(x, indices, sorted_indices=sorted_indices)
    assert rel_err(plain, expected) > 1e-2  # the adapter is no no-op here


@pytest.mark.parametrize("arch, quantized", CASES, ids=IDS)
def test_m_at_its_initial_value_and_zero_b_give_the_base(arch, quantized):
    model = tiny.build(arch, quantization=tiny.Q4 if quantized else None)[0]
    path = f"{SWITCHES[arch]}.down_proj"
    apply(model, f"{path}: dora(r=4)\n")
    layer = module_at(model, path)
    expected_m = mx.linalg.norm(dense_weight(layer.linear).astype(mx.float32), axis=-1)
    assert layer.m.shape == (layer.num_experts, layer.lora_b.shape[1]) and layer.m.dtype == mx.float32
    assert mx.allclose(layer.m, expected_m, rtol=1e-6).item()
    x, indices, _ = routed_inputs(layer)
    assert rel_err(layer(x, indices), layer.linear(x, indices)) < 2e-6


@pytest.mark.parametrize("arch, quantized", CASES, ids=IDS)
def test_gradients_are_finite_and_equal_the_references_with_the_norm_held_constant(arch, quantized):
    _, layer = adapted_switch(arch, quantized)
    x, indices, _ = routed_inputs(layer)
    mx.random.seed(5)
    cotangent = mx.random.normal(layer(x, indices).shape)
    params = {k: layer[k] for k in ("lora_a", "lora_b", "m")}

    def ours(p):
        layer.update(p)
        return (layer(x, indices) * cotangent).sum()

    def theirs(p, detach):
        weight = dense_weight(layer.linear).astype(mx.float32)
        out = 0
        for e in range(layer.num_experts):
            adapted = weight[e] + SCALE * (p["lora_b"][e] @ p["lora_a"][e])
            norm = mx.linalg.norm(adapted, axis=1)
            norm = mx.stop_gradient(norm) if detach else norm
            out = out + (indices == e)[..., None, None] * ((p["m"][e] / norm) * (x @ adapted.T))
        return (out * cotangent).sum()

    got = mx.grad(ours)(params)
    detached = mx.grad(lambda p: theirs(p, True))(params)
    attached = mx.grad(lambda p: theirs(p, False))(params)
    for k in params:
        assert mx.all(mx.isfinite(got[k])).item(), k
        assert rel_err(got[k], detached[k]) < 2e-5, k
    # mlx-lm's DoRALinear holds the norm constant; differentiating through it would give other factor gradients
    assert rel_err(attached["lora_b"], detached["lora_b"]) > 1e-3


@pytest.mark.parametrize("arch, quantized", CASES, ids=IDS)
def test_fuse_gives_the_adapted_output(arch, quantized):
    _, layer = adapted_switch(arch, quantized)
    x, indices, _ = routed_inputs(layer)
    expected = layer(x, indices)
    dense = layer.fuse(dequantize=True)
    assert type(dense).__name__ == "SwitchLinear" and ("bias" in dense) == ("bias" in layer.linear)
    assert rel_err(dense(x, indices), expected) < 2e-5
    fused = layer.fuse()
    assert type(fused) is type(layer.linear)
    if quantized:
        assert (fused.bits, fused.group_size) == (layer.linear.bits, layer.linear.group_size)
        assert rel_err(fused(x, indices), expected) < 0.2  # requantized: within half a 4-bit step per weight
    else:
        assert rel_err(fused(x, indices), expected) < 2e-5


def test_dropout_acts_in_training_only():
    _, layer = adapted_switch("mixtral", False, dropout=0.5)
    x, indices, _ = routed_inputs(layer)
    layer.train(True)
    first, second = layer(x, indices), layer(x, indices)
    assert not mx.allclose(first, second).item()
    layer.train(False)
    assert mx.array_equal(layer(x, indices), layer(x, indices)).item()
    assert rel_err(layer(x, indices), reference(layer, x, indices)) < 2e-5


def test_weight_reads_the_base_and_only_the_factors_and_m_train():
    model, layer = adapted_switch("qwen2_moe", True)
    assert layer.weight is layer.linear.weight
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert {k.rsplit(".", 1)[1] for k in trainable} == {"lora_a", "lora_b", "m"}


def test_training_steps_change_a_b_and_m_and_lower_the_loss():
    import mlx.nn as nn
    import mlx.optimizers as optim

    model = tiny.build("qwen2_moe")[0]
    apply(model, "layers[*].mlp.switch_mlp.*: dora(r=4)\n")
    model.train()
    tokens = mx.array([[1, 5, 9, 2, 7, 3, 11, 4, 8, 6]])

    def loss(m):
        return nn.losses.cross_entropy(m(tokens[:, :-1]), tokens[:, 1:]).mean()

    before = dict(tree_flatten(model.trainable_parameters()))
    optimizer = optim.Adam(learning_rate=1e-2)
    first = None
    for _ in range(3):  # B starts at zero, so A moves from the second step on, as in LoRA
        value, grads = nn.value_and_grad(model, loss)(model)
        assert all(mx.all(mx.isfinite(g)).item() for _, g in tree_flatten(grads))
        first = value if first is None else first
        optimizer.update(model, grads)
        mx.eval(model.parameters())
    after = dict(tree_flatten(model.trainable_parameters()))
    for kind in ("lora_a", "lora_b", "m"):
        names = [k for k in before if k.endswith(kind)]
        assert names and all(not mx.array_equal(before[k], after[k]).item() for k in names), kind
    assert loss(model).item() < first.item()
