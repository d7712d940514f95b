"""Sibling LoRA linears packed into one (stacked bases, block-diagonal B) against mlx-lm's LoRALinear, one by one."""

import copy
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tuner.lora import LoRALinear as MlxLmLoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from adapterspec.adapters import lowrank, pathchoice, siblings
from adapterspec.adapters.install import apply
from adapterspec.adapters.lora import LoRALinear
from tests.models import build

IN, WIDTHS, SCALE = 32, (40, 16, 16), 20.0
RANKS = {"ranks alike": (4, 4, 4), "ranks unlike": (4, 2, 4)}  # the block-diagonal's two constructions


def rel_err(a, b):
    return (
        mx.linalg.norm((a - b).astype(mx.float32).flatten()) / mx.linalg.norm(b.astype(mx.float32).flatten())
    ).item()


def mlxlm_siblings(bias: bool, dtype, ranks=RANKS["ranks unlike"]):
    """mlx-lm LoRALinear layers on linears of WIDTHS outputs (of the given ranks, A and B random, float32)."""
    mx.random.seed(0)
    layers = []
    for width, r in zip(WIDTHS, ranks):
        base = nn.Linear(IN, width, bias=bias)
        base.set_dtype(dtype)
        layer = MlxLmLoRALinear.from_base(base, r=r, scale=SCALE)
        layer.lora_b = 0.1 * mx.random.normal(layer.lora_b.shape)
        layers.append(layer)
    return layers


def packed_call(layers, dtype):
    """A function of (x, A₁, A₂, …, B₁, B₂, …) giving every layer's output through `lowrank.packed_linears`."""
    weight = mx.concatenate([layer.linear.weight for layer in layers])
    bias = mx.concatenate([layer.linear.bias for layer in layers]) if "bias" in layers[0].linear else None
    n = len(layers)

    def call(x, *params):
        a = mx.concatenate(params[:n], axis=1).astype(dtype)
        return lowrank.packed_linears(x, a, list(params[n:]), [SCALE] * n, weight, bias)

    return call


def mlxlm_call(layers):
    n = len(layers)

    def call(x, *params):
        outputs = []
        for layer, a, b in zip(layers, params[:n], params[n:]):
            layer.lora_a, layer.lora_b = a, b
            outputs.append(layer(x))
        return outputs

    return call


@pytest.mark.parametrize("ranks", RANKS.values(), ids=RANKS.keys())
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype,tolerance", [(mx.float32, 2e-5), (mx.bfloat16, 2e-2)])
def test_packed_siblings_give_the_outputs_and_gradients_of_mlxlm_layers(bias, dtype, tolerance, ranks):
    layers = mlxlm_siblings(bias, dtype, ranks)
    x = mx.random.normal((2, 5, IN)).astype(dtype)
    params = [layer.lora_a for layer in layers] + [layer.lora_b for layer in layers]
    cotangents = [mx.random.normal((2, 5, w)).astype(dtype) for w in WIDTHS]

    ours, ours_grads = mx.vjp(packed_call(layers, dtype), [x, *params], cotangents)
    theirs, their_grads = mx.vjp(mlxlm_call(layers), [x, *params], cotangents)

    assert [o.shape for o in ours] == [(2, 5, w) for w in WIDTHS]
    for o, t in zip(ours, theirs):
        assert o.dtype == t.dtype == dtype
        assert rel_err(o, t) < tolerance
    assert [g.shape for g in ours_grads] == [g.shape for g in their_grads]
    for name, o, t in zip(["x"] + [f"a{i}" for i in range(3)] + [f"b{i}" for i in range(3)], ours_grads, their_grads):
        assert rel_err(o, t) < tolerance, name


def test_block_diagonal_places_each_block_and_zeros_elsewhere():
    blocks = [mx.full((2, 3), 1.0), mx.full((1, 2), 2.0)]
    expected = mx.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 2, 2]], dtype=mx.float32)
    assert mx.array_equal(lowrank.block_diagonal(blocks), expected)


@pytest.mark.parametrize("heights", [(2, 2, 2), (2, 1, 2)], ids=["heights alike", "heights unlike"])
def test_block_diagonal_scales_casts_and_keeps_each_block_in_its_place(heights):
    widths = (3, 2, 4)
    blocks = [mx.random.normal((h, w)) for h, w in zip(heights, widths)]
    blocks[1] = mx.where(mx.arange(widths[1]) == 0, float("nan"), blocks[1])  # a NaN stays in its own block
    scales = (2.0, 0.5, 3.0)
    out = lowrank.block_diagonal(blocks, scales, mx.bfloat16)
    assert out.dtype == mx.bfloat16 and out.shape == (sum(heights), sum(widths))
    r = n = 0
    for block, h, w, s in zip(blocks, heights, widths, scales):
        inside = out[r : r + h, n : n + w]
        assert mx.array_equal(inside, (s * block).astype(mx.bfloat16), equal_nan=True)
        elsewhere = mx.concatenate([out[r : r + h, :n], out[r : r + h, n + w :]], axis=1)
        assert mx.array_equal(elsewhere, mx.zeros_like(elsewhere))
        r, n = r + h, n + w


# --- packed through a whole model ---------------------------------------------------------------------------------

SPEC = "layers[*].self_attn.<q,k,v,o>_proj: lora(r=4, scale=20)\nlayers[*].mlp.*_proj: lora(r=2, scale=20)\n"
PATHS = [f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")
]


@pytest.fixture
def packing(monkeypatch):
    """Packing forced; the sizes of every run packed, in order."""
    monkeypatch.setattr(lowrank, "pack_siblings", "always")
    runs = []
    real = lowrank.packed_linears

    def counting(x, a, bs, scales, weight, bias):
        runs.append(len(bs))
        return real(x, a, bs, scales, weight, bias)

    monkeypatch.setattr(lowrank, "packed_linears", counting)
    return runs


def adapted_llama(bias: bool = False):
    model, _ = build("llama", **({"attention_bias": True, "mlp_bias": True} if bias else {}))
    apply(model, SPEC)
    mx.random.seed(7)
    model.update(tree_map(lambda p: 0.1 * mx.random.normal(p.shape), model.trainable_parameters()))
    model.train()
    return model


def loss_and_grads(model, inputs):
    loss, grads = nn.value_and_grad(model, lambda m, x: nn.losses.cross_entropy(m(x), x).mean())(model, inputs)
    mx.eval(loss, grads)
    return loss.item(), dict(tree_flatten(grads))


def tokens():
    mx.random.seed(3)
    return mx.random.randint(0, 64, (2, 6))


def mlxlm_twin(model, bias: bool):
    """The same base (built again from the same seed) with mlx-lm's LoRA layers holding `model`'s adapters."""
    theirs, _ = build("llama", **({"attention_bias": True, "mlp_bias": True} if bias else {}))
    theirs.freeze()
    for rank, names in ((4, PATHS[:4]), (2, PATHS[4:])):
        linear_to_lora_layers(theirs, len(theirs.layers), {"rank": rank, "scale": 20.0, "dropout": 0.0, "keys": names})
    theirs.update(model.trainable_parameters())
    theirs.train()
    return theirs


@pytest.mark.parametrize("bias", [False, True])
def test_a_model_with_packed_siblings_trains_as_mlxlm_layers(packing, bias):
    """q/k/v and gate/up packed (once the first block has shown who reads one input): the loss and every adapter
    gradient equal those of mlx-lm's layers on the same model."""
    model = adapted_llama(bias)
    assert ("bias" in model.layers[0].self_attn.q_proj.linear) == bias == ("bias" in model.layers[0].mlp.up_proj.linear)
    layers = len(model.layers)
    inputs = tokens()
    groups = {id(m.sibling_group): m.sibling_group for _, m in model.named_modules() if hasattr(m, "sibling_group")}
    first_loss, first = loss_and_grads(model, inputs)
    # the first block's groups learn as they go; the others, alike, pack q/k/v and gate/up from the first forward
    assert packing == [3, 2] * (layers - 1)
    assert all(not g._outputs for g in groups.values() if g is not None)  # every output packed was taken
    packing.clear()
    second_loss, second = loss_and_grads(model, inputs)
    assert packing == [3, 2] * layers
    assert all(not g._outputs for g in groups.values() if g is not None)
    theirs_loss, theirs = loss_and_grads(mlxlm_twin(model, bias), inputs)
    assert set(first) == set(theirs) and len(theirs) == 7 * 2 * layers
    for loss, grads in ((first_loss, first), (second_loss, second)):
        assert abs(loss - theirs_loss) < 1e-5
        for name in theirs:
            assert rel_err(grads[name], theirs[name]) < 1e-4, name


def test_packed_bases_are_views_of_one_stack_and_add_no_memory(packing):
    model, _ = build("llama")
    mx.eval(model.parameters())
    before = mx.get_active_memory()
    apply(model, SPEC)
    attention = model.layers[0].self_attn
    group = attention.q_proj.sibling_group
    stacked = [attention[n].linear for n in ("q_proj", "k_proj", "v_proj", "o_proj")]  # in the parent's order
    assert group.stack is not None and all(m.linear is linear for m, linear in zip(group.members, stacked))
    adapters = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    assert mx.get_active_memory() - before <= adapters


def test_a_compiled_step_packs_and_equals_the_eager_step(packing):
    def trained(compiled):
        model = adapted_llama()
        optimizer = optim.Adam(learning_rate=1e-2)
        state = [model.state, optimizer.state]

        def step(inputs):
            loss, grads = nn.value_and_grad(model, lambda m, x: nn.losses.cross_entropy(m(x), x).mean())(model, inputs)
            optimizer.update(model, grads)
            return loss

        if compiled:
            step = partial(mx.compile, inputs=state, outputs=state)(step)
        losses = [step(tokens()) for _ in range(3)]
        mx.eval(losses, state)
        return [loss.item() for loss in losses], dict(tree_flatten(model.trainable_parameters()))

    eager_losses, eager = trained(False)
    packing.clear()
    compiled_losses, compiled = trained(True)
    assert packing  # traced once, in the first step: every block but the first packs
    for a, b in zip(eager_losses, compiled_losses):
        assert abs(a - b) < 1e-5
    for name in eager:
        assert rel_err(compiled[name], eager[name]) < 2e-5, name


@pytest.mark.parametrize("change", ["load_weights", "set_dtype", "attribute"])
def test_assigning_a_stacked_base_weight_stops_packing_and_uses_the_new_weight(packing, change):
    model = adapted_llama()
    inputs = tokens()
    loss_and_grads(model, inputs)
    q = model.layers[1].self_attn.q_proj
    new_weight = mx.zeros_like(q.linear.weight)
    if change == "load_weights":
        model.load_weights([("model.layers.1.self_attn.q_proj.linear.weight", new_weight)], strict=False)
    elif change == "set_dtype":
        model.set_dtype(mx.float32)  # float32 already: every array is assigned again, as new arrays
        new_weight = q.linear.weight
    else:
        q.linear.weight = new_weight
    packing.clear()
    loss, grads = loss_and_grads(model, inputs)
    assert len(packing) < 2 * len(model.layers)  # that block's attention is no longer packed
    lowrank.pack_siblings = "never"
    try:
        reference_loss, reference = loss_and_grads(model, inputs)
    finally:
        lowrank.pack_siblings = "always"
    assert abs(loss - reference_loss) < 1e-5
    for name in reference:
        assert rel_err(grads[name], reference[name]) < 2e-5, name


def test_the_last_sibling_takes_its_packed_output_where_alone_it_would_take_the_merged_path(packing):
    """At enough tokens the bytes-moved model picks the merged path for every linear; a sibling whose output was
    packed with its partners' takes that output instead, the last one called as well as the first."""
    model = adapted_llama()
    mx.random.seed(3)
    many = mx.random.randint(0, 64, (4, 32))
    v_proj = model.layers[0].self_attn.v_proj
    assert lowrank.use_merged(many.size, v_proj.lora_a.shape[0], v_proj.lora_b.shape[1], training=True)
    loss_and_grads(model, many)
    packing.clear()
    loss_and_grads(model, many)
    assert packing == [3, 2] * len(model.layers)
    groups = {id(m.sibling_group): m.sibling_group for _, m in model.named_modules() if hasattr(m, "sibling_group")}
    assert all(not g._outputs for g in groups.values() if g is not None)


@pytest.mark.parametrize("faster", ["packed", "shared"])
def test_measured_packing_keeps_the_faster_path_and_trains_as_mlxlm_layers(faster, monkeypatch):
    """With packing "auto" where paths are measured, each run's key times packed against shared (random arrays of
    its shapes, a timer that runs each candidate) and keeps the faster; the gradients equal mlx-lm's either way."""
    costs, seen, packs = {"packed": 2.0, "shared": 2.0, "separate": 1.0, "merged": 2.0}, [], []
    costs[faster] = 1.0

    def fake_timer(name, run):
        mx.eval(run())
        seen.append(name)
        return costs[name]

    real_pack = siblings.pack

    def counting(run, *args):
        packs.append(len(run))
        return real_pack(run, *args)

    measured_packing(monkeypatch, fake_timer)
    monkeypatch.setattr(siblings, "pack", counting)
    model = adapted_llama()
    inputs = tokens()
    loss_and_grads(model, inputs)
    loss, grads = loss_and_grads(model, inputs)
    packed_keys = {k: v for k, v in pathchoice.choices.items() if '"packed"' in k}
    assert len(packed_keys) == 2 and set(packed_keys.values()) == {faster}  # q/k/v and gate/up
    assert {"packed", "shared"} <= set(seen)
    assert (packs[-2:] == [3, 2]) == (faster == "packed")
    # o_proj measured its own paths on a random twin of itself: copying its stacked base let no stack go
    assert all(group.stack.weight is not None for group in sibling_groups(model))
    theirs_loss, theirs = loss_and_grads(mlxlm_twin(model, False), inputs)
    assert abs(loss - theirs_loss) < 1e-5
    for name in theirs:
        assert rel_err(grads[name], theirs[name]) < 1e-4, name


def measured_packing(monkeypatch, timer):
    """Path choices measured (with `timer`) and packing "auto", nothing remembered from before."""
    monkeypatch.setattr(lowrank, "merge_mode", "measure")
    monkeypatch.setattr(lowrank, "pack_siblings", "auto")
    monkeypatch.setattr(pathchoice, "timer", timer)
    monkeypatch.setattr(pathchoice, "cache_file", None)
    monkeypatch.setattr(pathchoice, "choices", {})
    monkeypatch.setattr(pathchoice, "timings", {})
    monkeypatch.setattr(pathchoice, "_loaded_from", None)


def sibling_groups(model) -> list:
    groups = {id(m.sibling_group): m.sibling_group for _, m in model.named_modules() if hasattr(m, "sibling_group")}
    return [g for g in groups.values() if g is not None]


@pytest.mark.parametrize("how", ["random twin", "copy", "deepcopy"])
def test_a_copy_of_a_stacked_base_is_a_plain_linear_and_lets_no_stack_go(packing, how):
    model = adapted_llama()
    q = model.layers[0].self_attn.q_proj
    group = q.sibling_group
    copied = {"random twin": pathchoice.random_twin, "copy": copy.copy, "deepcopy": copy.deepcopy}[how](q.linear)
    assert type(copied) is nn.Linear and group.stack.weight is not None
    assert copied.weight.shape == q.linear.weight.shape
    if how != "random twin":
        assert mx.array_equal(copied.weight, q.linear.weight)
    copied.weight = mx.zeros_like(copied.weight)
    assert group.stack.weight is not None and "_stack" in q.linear.__dict__


@pytest.mark.parametrize("fastest", ["packed", "shared", "merged"])
def test_in_eval_a_run_of_siblings_takes_its_measured_path_and_gives_mlxlm_outputs(fastest, monkeypatch):
    """In eval, a run of siblings times packed, shared and each layer merged (one key per run's shapes) and every
    member follows the fastest; the logits equal those of mlx-lm's layers whichever it is."""
    costs = {"packed": 2.0, "shared": 2.0, "merged": 2.0, "separate": 3.0}  # alone, each layer would merge
    costs[fastest] = 1.0
    seen, packs, merges = [], [], []

    def fake_timer(name, run):
        mx.eval(run())
        seen.append(name)
        return costs[name]

    measured_packing(monkeypatch, fake_timer)
    real_pack, real_merged = siblings.pack, LoRALinear._merged
    monkeypatch.setattr(siblings, "pack", lambda run, *args: packs.append(len(run)) or real_pack(run, *args))
    monkeypatch.setattr(LoRALinear, "_merged", lambda self, x: merges.append(self) or real_merged(self, x))
    model = adapted_llama()
    model.eval()
    inputs = tokens()
    mx.eval(model(inputs))  # the first forward pass shows which siblings read one input
    packs.clear()
    merges.clear()
    logits = model(inputs)
    eval_keys = {k: v for k, v in pathchoice.choices.items() if '"packed"' in k}
    assert len(eval_keys) == 2 and set(eval_keys.values()) == {fastest}  # q/k/v and gate/up
    assert {"packed", "shared", "merged"} <= set(seen)
    runs = [block.self_attn for block in model.layers] + [block.mlp for block in model.layers]
    members = {id(m) for parent in runs for name, m in parent.items() if name in ("q_proj", "k_proj", "v_proj",
                                                                                    "gate_proj", "up_proj")}  # fmt: skip
    assert packs == ([3, 2] * len(model.layers) if fastest == "packed" else [])
    assert ({id(m) for m in merges} >= members) == (fastest == "merged")
    assert all(group.stack.weight is not None for group in sibling_groups(model))
    theirs = mlxlm_twin(model, False)
    theirs.eval()
    assert rel_err(logits, theirs(inputs)) < 1e-5


def test_measured_packing_leaves_calls_above_the_row_limit_to_the_shared_path(monkeypatch):
    """Above `lowrank.PACK_MAX_ROWS` rows a run is neither timed packed nor packed, however fast packing would time;
    at the limit it is."""
    packs = []

    def packed_fastest(name, run):
        mx.eval(run())
        return 1.0 if name == "packed" else 2.0

    measured_packing(monkeypatch, packed_fastest)
    real_pack = siblings.pack
    monkeypatch.setattr(siblings, "pack", lambda run, *args: packs.append(len(run)) or real_pack(run, *args))
    model = adapted_llama()
    inputs = tokens()
    rows = inputs.size
    monkeypatch.setattr(lowrank, "PACK_MAX_ROWS", rows - 1)
    loss_and_grads(model, inputs)
    loss_and_grads(model, inputs)
    assert packs == [] and not any('"packed"' in key for key in pathchoice.choices)
    monkeypatch.setattr(lowrank, "PACK_MAX_ROWS", rows)
    loss_and_grads(model, inputs)
    assert packs[-2:] == [3, 2]
