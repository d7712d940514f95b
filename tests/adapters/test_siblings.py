"""Siblings that read one input share one low-rank product: which share, and that nothing else changes."""

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten, tree_map

from adapterspec.adapters import lowrank, siblings
from adapterspec.adapters.install import apply, from_base
from adapterspec.adapters.lora import LoRALinear
from tests.models import Q4, build

SPEC = "layers[*].self_attn.<q,k,v,o>_proj: lora(r=4, scale=20)\nlayers[*].mlp.*_proj: lora(r=2, scale=20)\n"
PATHS = [f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")
]
TOLERANCE = 2e-5  # float32: summation order only
# against mlx-lm's layers, through the whole model: its sums run in another order in every layer, with or
# without shared products (6.4e-5 measured for both)
MLXLM_TOLERANCE = 1e-4


def rel_err(a, b):
    return (mx.linalg.norm((a - b).flatten()) / mx.linalg.norm(b.flatten())).item()


def randomize_adapters(model):
    mx.random.seed(7)
    model.update(tree_map(lambda p: 0.1 * mx.random.normal(p.shape), model.trainable_parameters()))


def adapted_llama(quantization=None):
    model, _ = build("llama", quantization=quantization)
    apply(model, SPEC)
    randomize_adapters(model)
    model.train()
    return model


def loss_fn(model, inputs):
    return nn.losses.cross_entropy(model(inputs), inputs).mean()


def loss_and_grads(model, inputs):
    loss, grads = nn.value_and_grad(model, loss_fn)(model, inputs)
    mx.eval(loss, grads)
    return loss, dict(tree_flatten(grads))


def tokens():
    mx.random.seed(3)
    return mx.random.randint(0, 64, (2, 6))


@pytest.fixture
def products(monkeypatch):
    """The number of matrices of every shared product computed, in order."""
    counted = []
    real = siblings.shared_product

    def counting(x, matrices, dtype):
        counted.append(len(matrices))
        return real(x, matrices, dtype)

    monkeypatch.setattr(siblings, "shared_product", counting)
    return counted


def groups_of(model):
    found = [m.sibling_group for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    return {id(g): g for g in found if g is not None}


def test_siblings_that_read_one_input_share_one_product_per_forward(products):
    model = adapted_llama()
    layers = len(model.layers)
    groups = groups_of(model).values()
    assert sorted(len(g.members) for g in groups) == [2] * layers + [4] * layers  # down_proj has none
    loss_and_grads(model, tokens())
    # the first block's attention product also covers o_proj (not yet seen to read another input; its columns are
    # dropped); the later blocks' groups, alike, learned from it that o_proj reads another input
    assert products == [4, 2] + [3, 2] * (layers - 1)
    assert all(g._input is None and not g._parts for g in groups)  # no array held past the forward
    products.clear()
    loss_and_grads(model, tokens())
    assert products == [3, 2] * layers  # o_proj was given another input: it no longer takes part
    assert all(g._input is None and not g._parts for g in groups)


def test_shared_products_give_the_gradients_of_unshared_ones_and_of_mlxlm_layers(monkeypatch):
    from mlx_lm.tuner.utils import linear_to_lora_layers

    inputs = tokens()
    ours = adapted_llama()
    shared_loss, shared = loss_and_grads(ours, inputs)
    monkeypatch.setattr(lowrank, "share_siblings", False)
    unshared_loss, unshared = loss_and_grads(ours, inputs)

    theirs, _ = build("llama")
    theirs.freeze()
    for rank, names in ((4, PATHS[:4]), (2, PATHS[4:])):
        linear_to_lora_layers(theirs, len(theirs.layers), {"rank": rank, "scale": 20.0, "dropout": 0.0, "keys": names})
    theirs.update(ours.trainable_parameters())
    theirs.train()
    mlxlm_loss, mlxlm = loss_and_grads(theirs, inputs)

    assert set(shared) == set(mlxlm) and len(shared) == 7 * 2 * len(ours.layers)
    assert abs(shared_loss.item() - mlxlm_loss.item()) < 1e-5 and abs(shared_loss.item() - unshared_loss.item()) < 1e-5
    for name in shared:
        assert rel_err(shared[name], mlxlm[name]) < MLXLM_TOLERANCE, name
        assert rel_err(shared[name], unshared[name]) < TOLERANCE, name


def trained(compiled: bool, inputs, steps: int = 3):
    """Losses and adapter weights after `steps` Adam steps, compiled as mlx-lm's trainer compiles them or not."""
    model = adapted_llama()
    optimizer = optim.Adam(learning_rate=1e-2)
    state = [model.state, optimizer.state]

    def step(inputs):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, inputs)
        optimizer.update(model, grads)
        return loss

    if compiled:
        step = partial(mx.compile, inputs=state, outputs=state)(step)
    losses = [step(inputs) for _ in range(steps)]
    mx.eval(losses, state)
    return losses, dict(tree_flatten(model.trainable_parameters()))


def test_compiled_step_with_shared_products_equals_the_eager_step(products):
    inputs = tokens()
    eager_losses, eager = trained(False, inputs)
    compiled_losses, compiled = trained(True, inputs)
    assert products  # both took the shared path
    for a, b in zip(eager_losses, compiled_losses):
        assert abs(a.item() - b.item()) < 1e-5
    for name in eager:
        assert rel_err(compiled[name], eager[name]) < TOLERANCE, name


class TwoInputs(nn.Module):
    """Three linears of one parent, the middle one given another input than the other two."""

    def __init__(self):
        super().__init__()
        self.first, self.middle, self.last = (nn.Linear(16, 16) for _ in range(3))

    def __call__(self, x, y):
        return self.first(x) * self.middle(y) + self.last(x)


def adapted_two_inputs():
    """`TwoInputs` with LoRA on its three linears (B random), linked as siblings: the parent and their group."""
    mx.random.seed(0)
    parent = TwoInputs()
    adapters = [
        (name, from_base("lora", getattr(parent, name), r=2, scale=2.0)) for name in ("first", "middle", "last")
    ]
    for name, layer in adapters:
        layer.lora_b = 0.1 * mx.random.normal(layer.lora_b.shape)
        setattr(parent, name, layer)
    (group,) = siblings.link(adapters)
    return parent, group


def test_a_sibling_given_another_input_takes_its_own_product(products, monkeypatch):
    parent, _ = adapted_two_inputs()
    x, y = mx.random.normal((3, 16)), mx.random.normal((3, 16))

    def grads():
        loss, g = nn.value_and_grad(parent, lambda m: m(x, y).sum())(parent)
        mx.eval(loss, g)
        return loss, dict(tree_flatten(g))

    first_round, second_round = grads(), grads()
    # round one: `first` computes for all three, `middle` (another input) then for itself and `last`,
    # `last` (x again) for itself alone; round two: `first` and `last` share, `middle` goes alone
    assert products == [3, 2, 2]
    monkeypatch.setattr(lowrank, "share_siblings", False)
    reference = grads()
    for loss, g in (first_round, second_round):
        assert abs(loss.item() - reference[0].item()) < 1e-5
        for name in g:
            assert rel_err(g[name], reference[1][name]) < TOLERANCE, name


def test_siblings_share_where_each_alone_would_take_the_merged_path(products):
    """At enough tokens the bytes-moved model picks the merged path for every linear; in training, siblings on a dense
    base share their product instead, the last one called as well as the first."""
    model = adapted_llama()
    mx.random.seed(3)
    many = mx.random.randint(0, 64, (4, 32))
    for name in PATHS:
        layer = model.layers[0][name.split(".")[0]][name.split(".")[1]]
        assert lowrank.use_merged(many.size, layer.lora_a.shape[0], layer.lora_b.shape[1], training=True), name
    loss_and_grads(model, many)
    assert products == [4, 2] + [3, 2] * (len(model.layers) - 1)


def test_a_forced_merged_path_is_not_overridden(products, monkeypatch):
    monkeypatch.setattr(lowrank, "merge_mode", "always")
    loss_and_grads(adapted_llama(), tokens())
    assert products == []


def test_quantized_siblings_share_on_the_separate_path(products, monkeypatch):
    monkeypatch.setattr(lowrank, "merge_mode", "never")
    inputs = tokens()
    model = adapted_llama(quantization=Q4)
    shared_loss, shared = loss_and_grads(model, inputs)
    assert products and all(n in (2, 3, 4) for n in products)
    monkeypatch.setattr(lowrank, "share_siblings", False)
    unshared_loss, unshared = loss_and_grads(model, inputs)
    assert abs(shared_loss.item() - unshared_loss.item()) < 1e-5
    for name in shared:
        assert rel_err(shared[name], unshared[name]) < TOLERANCE, name


def test_a_sibling_with_dropout_does_not_share(products):
    model = adapted_llama()
    for layer in model.layers:
        layer.self_attn.k_proj.dropout = nn.Dropout(p=0.5)
        layer.self_attn.k_proj.dropout_p = 0.5
    loss_and_grads(model, tokens())
    # q, v and o (o not yet seen to read another input), then q and v in the blocks that learned from the first
    assert products == [3, 2] + [2, 2] * (len(model.layers) - 1)


def test_the_input_gradient_of_sharing_siblings_equals_the_unshared_one(products, monkeypatch):
    """x's gradient (every sibling's base and the shared low-rank part), in the first round and once partners are
    known, equals the one of layers that share nothing."""
    parent, group = adapted_two_inputs()
    x, y = mx.random.normal((2, 3, 16)), mx.random.normal((2, 3, 16))

    def input_grads():
        grads = mx.grad(lambda x, y: (parent(x, y) ** 2).sum(), argnums=(0, 1))(x, y)
        mx.eval(grads)
        return grads

    shared = [input_grads() for _ in range(2)]  # the first round, then the second (first and last share)
    assert products == [3, 2, 2]
    assert group._input is None and not group._parts
    monkeypatch.setattr(lowrank, "share_siblings", False)
    reference = input_grads()
    for grads in shared:
        for got, expected in zip(grads, reference):
            assert rel_err(got, expected) < TOLERANCE


def test_siblings_with_frozen_a_train_as_unshared_ones(products, monkeypatch):
    """With every A frozen (LoRA-FA), the first block's attention product (its input the embedding's, frozen) is
    not differentiated at all: B's gradients still equal the unshared ones."""
    inputs = tokens()
    model = adapted_llama()
    model.apply_to_modules(lambda _, m: m.freeze(keys=["lora_a"]) if isinstance(m, LoRALinear) else None)
    shared_loss, shared = loss_and_grads(model, inputs)
    assert products and all(name.endswith("lora_b") for name in shared)
    monkeypatch.setattr(lowrank, "share_siblings", False)
    unshared_loss, unshared = loss_and_grads(model, inputs)
    assert abs(shared_loss.item() - unshared_loss.item()) < 1e-5
    for name in shared:
        assert rel_err(shared[name], unshared[name]) < TOLERANCE, name
