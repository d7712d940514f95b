"""Adapter layers against mlx-lm's own classes and a float32 reference: outputs, fuses, gradients."""

import json
import subprocess
import sys
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchLinear
from mlx_lm.tuner import dora as mlxlm_dora
from mlx_lm.tuner import lora as mlxlm_lora

from adapterspec.adapters import fusemath, lowrank
from adapterspec.adapters.basemodules import dense_weight, quantization
from adapterspec.adapters.install import adapter_classes
from adapterspec.adapters.install import from_base as adapter_from_base
from adapterspec.model.kinds import TOKEN_KINDS

IN, OUT, EXPERTS, TOP_K, R, VOCAB, GROUP = 64, 48, 4, 2, 4, 96, 32
SCALE = 20.0

# Norm-wise relative error ‖ours − ref‖ / ‖ref‖ allowed per base variant. float32 math (dense or
# 4-bit with float32 scales) differs only in summation order; bfloat16 carries ~2^-9 rounding per
# op, so outputs and gradients computed in bf16 must agree with float32 to within 2 %.
TOLERANCE = {"float32": 2e-5, "q4": 2e-5, "bfloat16": 2e-2, "q4-bf16": 2e-2}
VARIANTS = list(TOLERANCE)
# Requantizing a fused weight to 4 bits moves each weight by up to half a quantization step.
REQUANTIZE_TOLERANCE = 0.2


class MlxLmDoRAPerExpert(nn.Module):
    """mlx-lm's DoRALinear applied expert by expert: expert e's weight (and bias) in a Linear or QuantizedLinear,
    wrapped in mlx-lm's DoRALinear with A_e, B_e, m_e taken from stacked (E, r, in), (E, out, r), (E, out) parameters;
    each row's output is that of the DoRALinear of the expert it is routed to."""

    @staticmethod
    def from_base(base, r, dropout, scale):
        twin = MlxLmDoRAPerExpert()
        twin.linear = base
        experts, out, inp = base.num_experts, base.output_dims, base.input_dims
        twin.lora_a, twin.lora_b = mx.zeros((experts, r, inp)), mx.zeros((experts, out, r))
        twin.m = fusemath.row_norms(dense_weight(base))
        # built once, outside the module tree (their parameters are the stacked ones above, set at each call)
        object.__setattr__(twin, "doras", [twin.expert_dora(e, r, scale) for e in range(experts)])
        return twin

    def expert_dora(self, e, r, scale):
        base, q = self.linear, quantization(self.linear)
        out, inp = base.output_dims, base.input_dims
        if q is None:
            linear = nn.Linear(inp, out, bias="bias" in base)
            linear.weight = base.weight[e]
        else:
            linear = nn.QuantizedLinear(inp, out, bias="bias" in base, group_size=q["group_size"], bits=q["bits"])
            linear.weight, linear.scales, linear.biases = base.weight[e], base.scales[e], base.biases[e]
        if "bias" in base:
            linear.bias = base.bias[e]
        return mlxlm_dora.DoRALinear.from_base(linear, r=r, dropout=0.0, scale=scale)

    def expert(self, e):
        """mlx-lm's DoRALinear of expert e, holding A_e, B_e and m_e."""
        dora = self.doras[e]
        dora.lora_a, dora.lora_b, dora.m = self.lora_a[e].T, self.lora_b[e].T, self.m[e]
        return dora

    def __call__(self, x, indices, sorted_indices=False):
        out = 0
        for e in range(self.linear.num_experts):
            routed = (indices == e)[..., None, None]
            out = out + routed * self.expert(e)(x)
        return out

    def fuse(self, dequantize=False):
        weight = mx.stack([self.expert(e).fuse(dequantize=True).weight for e in range(self.linear.num_experts)])
        fused = SwitchLinear(weight.shape[2], weight.shape[1], weight.shape[0], bias="bias" in self.linear)
        fused.weight = weight
        if "bias" in self.linear:
            fused.bias = self.linear.bias
        q = quantization(self.linear)
        return fused.to_quantized(**q) if q is not None and not dequantize else fused


MLXLM_CLASSES = {
    "lora": mlxlm_lora.LoRALinear,
    "switch-lora": mlxlm_lora.LoRASwitchLinear,
    "embedding-lora": mlxlm_lora.LoRAEmbedding,
    "dora": mlxlm_dora.DoRALinear,
    "dora-embedding": mlxlm_dora.DoRAEmbedding,
    "switch-dora": MlxLmDoRAPerExpert,  # mlx-lm has no DoRA on experts: its DoRALinear, expert by expert
}
FAMILY = {
    "lora": "linear",
    "dora": "linear",
    "switch-lora": "switch",
    "embedding-lora": "embedding",
    "dora-embedding": "embedding",
    "switch-dora": "switch",
}
KINDS = [
    kind for kind in adapter_classes() if kind not in TOKEN_KINDS
]  # the low-rank layers (tokens: test_inits_tokens)


@pytest.fixture(params=["never", "always"])
def path(request, monkeypatch):
    """Run the test once on the separate low-rank path and once on the merged-weight path."""
    monkeypatch.setattr(lowrank, "merge_mode", request.param)
    return request.param


def rel_err(a, b):
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.linalg.norm((a - b).flatten()) / mx.linalg.norm(b.flatten())).item()


def cpu_lacks_gather_mm(family, variant):
    return family == "switch" and variant == "bfloat16" and mx.default_device().type == mx.DeviceType.cpu


def make_base(family, variant, bias=True):
    """A base module of `family` in `variant` precision, and its dense float32 twin."""
    if cpu_lacks_gather_mm(family, variant):
        pytest.skip("MLX's CPU gather_mm computes in float32 only")
    mx.random.seed(1)
    if family == "linear":
        dense = nn.Linear(IN, OUT, bias=bias)
    elif family == "switch":
        dense = SwitchLinear(IN, OUT, EXPERTS, bias=bias)
    else:
        dense = nn.Embedding(VOCAB, IN)
    if "bias" in dense:
        dense.bias = 0.1 * mx.random.normal(dense.bias.shape)
    if variant in ("bfloat16", "q4-bf16"):
        dense.set_dtype(mx.bfloat16)
    base = dense
    if variant.startswith("q4"):
        if family == "linear":
            base = nn.QuantizedLinear.from_linear(dense, group_size=GROUP, bits=4)
        elif family == "switch":
            base = dense.to_quantized(group_size=GROUP, bits=4)
        else:
            base = nn.QuantizedEmbedding.from_embedding(dense, group_size=GROUP, bits=4)
    twin = type(dense).__new__(type(dense))
    nn.Module.__init__(twin)
    twin.weight = dense_weight(base).astype(mx.float32)
    if "bias" in base:
        twin.bias = base.bias.astype(mx.float32)
    return base, twin


def inputs(family, dtype, sort=False):
    """Inputs for one call of the adapter: linear x; switch (x, indices); embedding ids."""
    mx.random.seed(2)
    if family == "linear":
        return (mx.random.normal((2, 5, IN)).astype(dtype),)
    if family == "switch":
        x = mx.random.normal((2, 5, 1, 1, IN)).astype(dtype)
        indices = mx.random.randint(0, EXPERTS, (2, 5, TOP_K))
        if not sort:
            return (x, indices)
        flat = indices.flatten()
        order = mx.argsort(flat)
        return (x.flatten(0, -3)[order // TOP_K], flat[order], True)
    return (mx.random.randint(0, VOCAB, (2, 5)),)


def calls(family, dtype):
    """(name, function of a module, inputs) for every way the adapter is called."""
    if family == "linear":
        return [("call", lambda m, *a: m(*a), inputs(family, dtype))]
    if family == "switch":
        return [
            ("call", lambda m, *a: m(*a), inputs(family, dtype)),
            ("sorted", lambda m, *a: m(*a[:2], sorted_indices=a[2]), inputs(family, dtype, sort=True)),
        ]
    mx.random.seed(3)
    hidden = mx.random.normal((2, 5, IN)).astype(dtype)
    return [
        ("call", lambda m, *a: m(*a), inputs(family, dtype)),
        ("as_linear", lambda m, *a: m.as_linear(*a), (hidden,)),
    ]


def activation_dtype(variant):
    return mx.bfloat16 if variant in ("bfloat16", "q4-bf16") else mx.float32


def adapted(kind, base, random_b=True, dropout=0.0):
    mx.random.seed(4)
    layer = adapter_from_base(kind, base, r=R, scale=SCALE, dropout=dropout)
    if random_b:
        layer.lora_b = 0.01 * mx.random.normal(layer.lora_b.shape)
    if "m" in layer:
        layer.m = layer.m * (1 + 0.1 * mx.random.normal(layer.m.shape))
    return layer


def mlxlm_twin(kind, layer, base):
    """mlx-lm's adapter around `base`, holding `layer`'s adapter weights."""
    base.freeze()
    other = MLXLM_CLASSES[kind].from_base(base, r=R, dropout=0.0, scale=SCALE)
    other.update({k: layer[k] for k in ("lora_a", "lora_b", "m") if k in layer})
    return other


def mlxlm_supports(kind, variant):
    # mlx-lm's DoRAEmbedding reads the packed weight of a QuantizedEmbedding as if it were dense.
    return not (kind == "dora-embedding" and variant.startswith("q4"))


def grads(module, call, args, dtype, wrt_input):
    mx.random.seed(5)
    out_shape = call(module, *args).shape
    cotangent = mx.random.normal(out_shape)

    def loss(params, first):
        module.update(params)
        return (call(module, first, *args[1:]).astype(mx.float32) * cotangent).sum()

    argnums = (0, 1) if wrt_input else 0
    result = mx.grad(loss, argnums=argnums)(module.trainable_parameters(), args[0])
    g_params, g_input = result if wrt_input else (result, None)
    return dict(tree_flatten(g_params)), g_input


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_names_and_shapes_match_mlxlm(kind):
    base, _ = make_base(FAMILY[kind], "float32")
    ours = adapted(kind, base)
    theirs = MLXLM_CLASSES[kind].from_base(base, r=R, dropout=0.0, scale=SCALE)
    ours_shapes = {k: v.shape for k, v in tree_flatten(ours.parameters())}
    theirs_shapes = {k: v.shape for k, v in tree_flatten(theirs.parameters())}
    assert ours_shapes == theirs_shapes
    assert {k for k, _ in tree_flatten(ours.trainable_parameters())} == {
        k for k in ("lora_a", "lora_b", "m") if k in ours
    }
    for k, _ in tree_flatten(ours.trainable_parameters()):
        assert ours[k].dtype == mx.float32


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_b_equals_base(kind, variant, path):
    family = FAMILY[kind]
    base, _ = make_base(family, variant)
    layer = adapted(kind, base, random_b=False)
    if "m" in layer:
        layer.m = fusemath.row_norms(dense_weight(base))
    for name, call, args in calls(family, activation_dtype(variant)):
        expected = call(base, *args)
        got = call(layer, *args)
        assert got.dtype == expected.dtype, name
        assert rel_err(got, expected) <= TOLERANCE[variant], name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_match_mlxlm_and_float32_reference(kind, variant, path):
    family = FAMILY[kind]
    base, twin = make_base(family, variant)
    layer = adapted(kind, base)
    reference = mlxlm_twin(kind, layer, twin)
    theirs = mlxlm_twin(kind, layer, base) if mlxlm_supports(kind, variant) else None
    dtype = activation_dtype(variant)
    for name, call, args in calls(family, dtype):
        got = call(layer, *args)
        assert got.dtype == call(base, *args).dtype, name
        f32_args = tuple(a.astype(mx.float32) if isinstance(a, mx.array) and a.dtype == dtype else a for a in args)
        assert rel_err(got, call(reference, *f32_args)) <= TOLERANCE[variant], name
        if theirs is not None:
            assert rel_err(got, call(theirs, *args)) <= TOLERANCE[variant], name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_match_float32_reference(kind, variant, path):
    family = FAMILY[kind]
    base, twin = make_base(family, variant)
    layer = adapted(kind, base)
    reference = mlxlm_twin(kind, layer, twin)
    dtype = activation_dtype(variant)
    for name, call, args in calls(family, dtype):
        wrt_input = args[0].dtype != mx.int32 and args[0].dtype != mx.uint32
        ours_params, ours_input = grads(layer, call, args, dtype, wrt_input)
        f32_args = tuple(a.astype(mx.float32) if isinstance(a, mx.array) and a.dtype == dtype else a for a in args)
        ref_params, ref_input = grads(reference, call, f32_args, mx.float32, wrt_input)
        assert ours_params.keys() == ref_params.keys()
        for k in ref_params:
            assert ours_params[k].dtype == mx.float32
            assert rel_err(ours_params[k], ref_params[k]) <= TOLERANCE[variant], (name, k)
        if wrt_input:
            assert ours_input.dtype == dtype
            assert rel_err(ours_input, ref_input) <= TOLERANCE[variant], (name, "input")


@pytest.mark.parametrize("sum_in_base", [True, False])
def test_a_dense_base_adds_the_low_rank_term_before_rounding_once(sum_in_base, monkeypatch):
    """On a dense bfloat16 base the separate path's output and input gradient are rounded once, after the
    base's GEMM has added the low-rank term: base 1 + 2⁻⁸ (half a bfloat16 step above 1) plus a term of
    2⁻⁸ is exactly 1 + 2⁻⁷. Added after the base's output is rounded (the order before), it is 1."""
    monkeypatch.setattr(lowrank, "merge_mode", "never")
    monkeypatch.setattr(lowrank, "sum_in_base", sum_in_base)
    half_step, exact = 2.0**-8, 1 + 2.0**-7
    expected = exact if sum_in_base else 1.0

    forward_base = nn.Linear(2, 1, bias=False)
    forward_base.weight = mx.array([[1.0, 1.0]], dtype=mx.bfloat16)
    layer = adapter_from_base("lora", forward_base, r=1, scale=1.0)
    layer.lora_a, layer.lora_b = mx.array([[half_step], [0.0]]), mx.array([[1.0]])
    x = mx.array([[1.0, half_step]], dtype=mx.bfloat16)  # x·Wᵀ = 1 + 2⁻⁸, x·A·B = 2⁻⁸
    assert layer(x).dtype == mx.bfloat16
    assert layer(x).item() == expected

    backward_base = nn.Linear(1, 2, bias=False)
    backward_base.weight = mx.array([[1.0], [1.0]], dtype=mx.bfloat16)
    layer = adapter_from_base("lora", backward_base, r=1, scale=1.0)
    layer.lora_a, layer.lora_b = mx.array([[1.0]]), mx.array([[0.0, 1.0]])
    dy = mx.array([[1.0, half_step]], dtype=mx.bfloat16)  # dy·W = 1 + 2⁻⁸, (dy·Bᵀ)·Aᵀ = 2⁻⁸
    _, (dx,) = mx.vjp(layer, [mx.array([[1.0]], dtype=mx.bfloat16)], [dy])
    assert dx.dtype == mx.bfloat16
    assert dx.item() == expected


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_output_equals_adapter_output(kind, variant, path):
    family = FAMILY[kind]
    base, _ = make_base(family, variant)
    layer = adapted(kind, base)
    dense = layer.fuse(dequantize=True)
    fused = layer.fuse()
    assert type(fused) is type(base)
    assert quantization(fused) == quantization(base)
    assert dense_weight(dense).dtype == dense_weight(base).dtype
    assert quantization(dense) is None
    for name, call, args in calls(family, activation_dtype(variant)):
        expected = call(layer, *args)
        if not cpu_lacks_gather_mm(family, "bfloat16" if variant == "q4-bf16" else variant):
            assert rel_err(call(dense, *args), expected) <= TOLERANCE[variant], name
        tolerance = REQUANTIZE_TOLERANCE if variant.startswith("q4") else TOLERANCE[variant]
        assert rel_err(call(fused, *args), expected) <= tolerance, name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_weights_match_mlxlm(kind, variant):
    if not mlxlm_supports(kind, variant):
        pytest.skip("mlx-lm cannot fuse this combination")
    family = FAMILY[kind]
    base, _ = make_base(family, variant)
    layer = adapted(kind, base)
    theirs = mlxlm_twin(kind, layer, base)
    ours_dense, theirs_dense = layer.fuse(dequantize=True), theirs.fuse(dequantize=True)
    assert rel_err(ours_dense.weight, theirs_dense.weight) <= TOLERANCE[variant]
    if "bias" in base:
        assert mx.array_equal(ours_dense.bias, theirs_dense.bias)
    if variant.startswith("q4"):
        requantized = layer.fuse()
        assert "scales" in requantized and requantized.bits == base.bits
        assert rel_err(dense_weight(requantized), dense_weight(theirs.fuse())) <= REQUANTIZE_TOLERANCE


@pytest.mark.parametrize("kind", KINDS)
def test_fusemath_on_raw_arrays_equals_module_fuse(kind):
    base, _ = make_base(FAMILY[kind], "bfloat16")
    layer = adapted(kind, base)
    w = dense_weight(base)
    if "m" in layer:
        merged = fusemath.dora_fused_weight(kind, w, layer.lora_a, layer.lora_b, layer.m, SCALE)
    else:
        merged = fusemath.fused_weight(kind, w, layer.lora_a, layer.lora_b, SCALE)
        delta = fusemath.lora_delta(kind, layer.lora_a, layer.lora_b, SCALE, mx.float32)
        assert delta.shape == w.shape
    assert merged.dtype == w.dtype
    assert mx.array_equal(merged, layer.fuse(dequantize=True).weight)


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_active_in_training_and_off_in_eval(kind, path):
    family = FAMILY[kind]
    base, _ = make_base(family, "float32")
    layer = adapted(kind, base, dropout=0.5)
    plain = adapted(kind, base, dropout=0.0)
    for name, call, args in calls(family, mx.float32):
        layer.train(True)
        mx.random.seed(6)
        first = call(layer, *args)
        second = call(layer, *args)
        assert not mx.allclose(first, second), name
        assert not mx.allclose(first, call(plain, *args)), name
        layer.train(False)
        assert mx.array_equal(call(layer, *args), call(plain, *args)), name


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_weights_load_both_ways(kind, tmp_path):
    base, _ = make_base(FAMILY[kind], "float32")
    ours = adapted(kind, base)
    theirs = MLXLM_CLASSES[kind].from_base(base, r=R, dropout=0.0, scale=SCALE)
    path = str(tmp_path / "ours.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(ours.trainable_parameters())))
    theirs.load_weights(path, strict=False)
    for name, call, args in calls(FAMILY[kind], mx.float32):
        assert rel_err(call(ours, *args), call(theirs, *args)) <= TOLERANCE["float32"], name
    fresh = adapted(kind, base, random_b=False)
    fresh.load_weights(path, strict=False)
    for k in ("lora_a", "lora_b", "m"):
        if k in ours:
            assert mx.array_equal(fresh[k], ours[k])


@pytest.mark.parametrize("kind", KINDS)
def test_initialisation_is_reproducible_and_like_mlxlm(kind):
    base, _ = make_base(FAMILY[kind], "float32")
    mx.random.seed(7)
    first = adapter_from_base(kind, base, r=R)
    mx.random.seed(7)
    second = adapter_from_base(kind, base, r=R)
    assert mx.array_equal(first.lora_a, second.lora_a)
    assert not mx.any(first.lora_b).item()
    fan_in = first.lora_a.shape[-1] if FAMILY[kind] == "switch" else first.lora_a.shape[0]
    assert mx.abs(first.lora_a).max().item() <= 1 / fan_in**0.5
    assert first.scale == 20.0


def test_from_base_rejects_an_unknown_kind():
    base, _ = make_base("linear", "float32")
    with pytest.raises(ValueError, match="unknown adapter kind"):
        adapter_from_base("dora-switch", base)
    assert set(adapter_classes()) == {
        "lora",
        "switch-lora",
        "embedding-lora",
        "dora",
        "dora-embedding",
        "embedding-tokens",
        "switch-dora",
    }


def test_every_registered_kind_has_its_layer_with_the_registered_parameter_shapes():
    from adapterspec.model.kinds import KINDS

    assert set(adapter_classes()) == set(KINDS)
    for name, kind in KINDS.items():
        family = kind.family
        base, _ = make_base(family, "float32")
        size = {"rows": range(4)} if name in TOKEN_KINDS else {"r": 4}  # tokens: as many rows as a rank
        layer = adapter_classes()[name].from_base(base, **size)
        dims = (base.weight.shape[-2], base.weight.shape[-1]) if family != "embedding" else base.weight.shape
        n_in, n_out = (dims[1], dims[0]) if family != "embedding" else dims
        experts = base.weight.shape[0] if family == "switch" else None
        got = {p: tuple(getattr(layer, p).shape) for p in kind.params}
        assert got == kind.shapes(n_in, n_out, 4, experts), name


def test_importing_adapters_does_not_import_mlx_lm():
    code = "import sys, adapterspec.adapters; sys.exit('mlx_lm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_merged_path_is_chosen_by_bytes_moved(monkeypatch):
    monkeypatch.setattr(lowrank, "merge_mode", "auto")
    assert lowrank.use_merged(8192, 4096, 4096)
    assert not lowrank.use_merged(1, 4096, 4096)
    assert not lowrank.use_merged(1, 4096, 4096, training=False)
    assert lowrank.use_merged(16384, 4096, 4096, matrices=8)
    assert not lowrank.use_merged(16384, 4096, 4096, matrices=8, training=False)


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """Path choice by measurement, with a timer that runs each candidate but reports the seconds the test
    sets in `costs` (no clock), a fresh in-process cache and a cache file in tmp_path."""
    from adapterspec.adapters import pathchoice

    costs, seen = {"separate": 2.0, "merged": 1.0}, []

    def fake_timer(name, run):
        mx.eval(run())
        seen.append(name)
        return costs[name]

    monkeypatch.setattr(lowrank, "merge_mode", "measure")
    monkeypatch.setattr(pathchoice, "timer", fake_timer)
    monkeypatch.setattr(pathchoice, "cache_file", tmp_path / "paths.json")
    monkeypatch.setattr(pathchoice, "choices", {})
    monkeypatch.setattr(pathchoice, "timings", {})
    monkeypatch.setattr(pathchoice, "_loaded_from", None)
    return pathchoice, costs, seen


@pytest.mark.parametrize("kind", ["lora", "switch-lora", "embedding-lora"])
@pytest.mark.parametrize("faster", ["separate", "merged"])
def test_measured_choice_keeps_the_faster_path_and_matches_mlxlm(kind, faster, measured):
    pathchoice, costs, seen = measured
    costs[faster] = 0.5
    family = FAMILY[kind]
    base, _ = make_base(family, "float32")
    layer = adapted(kind, base)
    theirs = mlxlm_twin(kind, layer, base)
    name, call, args = calls(family, mx.float32)[-1]  # the linear call; the tied head for embeddings
    state = mx.array(mx.random.state[0])
    got = call(layer, *args)
    assert rel_err(got, call(theirs, *args)) <= TOLERANCE["float32"]
    assert mx.array_equal(mx.random.state[0], state), "measuring drew from the global random state"
    assert sorted(set(seen)) == ["merged", "separate"]
    assert list(pathchoice.choices.values()) == [faster]
    ours_params, _ = grads(layer, call, args, mx.float32, wrt_input=True)
    theirs_params, _ = grads(theirs, call, args, mx.float32, wrt_input=True)
    for k in theirs_params:
        assert rel_err(ours_params[k], theirs_params[k]) <= TOLERANCE["float32"], k


def test_measured_choice_is_cached_per_key_in_process_and_on_disk(measured):
    pathchoice, costs, seen = measured
    base, _ = make_base("linear", "float32")
    layer = adapted("lora", base)
    x = inputs("linear", mx.float32)[0]
    mx.eval(layer(x))
    first = len(seen)
    assert first > 0
    mx.eval(layer(x))
    assert len(seen) == first, "a second call at the same key measured again"
    layer.eval()
    mx.eval(layer(x))
    assert len(seen) > first, "eval mode is a key of its own"
    stored = json.loads(pathchoice.cache_file.read_text())
    assert sorted(stored.values()) == ["merged", "merged"]
    pathchoice.forget()
    costs["separate"] = 0.1  # a fresh process reads the file and measures nothing
    seen.clear()
    mx.eval(layer(x))
    assert seen == [] and set(pathchoice.choices.values()) == {"merged"}


@pytest.mark.parametrize("mode", ["always", "never", "auto", "model"])
def test_forced_paths_and_the_cpu_default_measure_nothing(mode, measured, monkeypatch):
    pathchoice, _, seen = measured
    monkeypatch.setattr(lowrank, "merge_mode", mode)
    base, _ = make_base("linear", "float32")
    layer = adapted("lora", base)
    mx.eval(layer(inputs("linear", mx.float32)[0]))
    if mode == "auto" and mx.default_device().type == mx.DeviceType.gpu:
        pytest.skip("auto measures on a GPU")
    assert seen == [] and pathchoice.choices == {}


def test_measured_choice_inside_a_compiled_training_step_matches_mlxlm(measured):
    """The first trace of a compiled step (arrays are tracers there) measures on arrays of its own."""
    import mlx.optimizers as optim

    pathchoice, _, seen = measured
    base, _ = make_base("linear", "float32")
    ours, theirs = adapted("lora", base), None
    theirs = mlxlm_twin("lora", ours, base)
    x = inputs("linear", mx.float32)[0]
    results = []
    for model in (ours, theirs):
        optimizer = optim.Adam(learning_rate=1e-2)
        state = [model.state, optimizer.state]

        def loss(m, x):
            return (m(x) ** 2).mean()

        value_and_grad = nn.value_and_grad(model, loss)

        @partial(mx.compile, inputs=state, outputs=state)
        def step(x, model=model, optimizer=optimizer, value_and_grad=value_and_grad):
            value, grad = value_and_grad(model, x)
            optimizer.update(model, grad)
            return value

        results.append([step(x).item() for _ in range(3)])
    assert seen, "nothing was measured"
    assert results[0] == pytest.approx(results[1], rel=1e-4)
    assert rel_err(ours.lora_b, theirs.lora_b) <= 1e-4


@pytest.mark.parametrize("mode", ["always", "never", "measure"])
def test_a_trainable_base_gets_its_gradient_on_every_path(mode, measured, monkeypatch):
    """The custom paths treat the base as a constant, so a base left trainable takes the autodiff path."""
    monkeypatch.setattr(lowrank, "merge_mode", mode)
    base, _ = make_base("linear", "float32")
    ours = adapter_from_base("lora", base, r=R, scale=SCALE, freeze_base=False)
    ours.lora_b = 0.01 * mx.random.normal(ours.lora_b.shape)
    theirs = MLXLM_CLASSES["lora"].from_base(base, r=R, dropout=0.0, scale=SCALE)
    theirs.update({k: ours[k] for k in ("lora_a", "lora_b")})
    theirs.linear.unfreeze()
    name, call, args = calls("linear", mx.float32)[0]
    ours_params, _ = grads(ours, call, args, mx.float32, wrt_input=False)
    theirs_params, _ = grads(theirs, call, args, mx.float32, wrt_input=False)
    assert "linear.weight" in ours_params and ours_params.keys() == theirs_params.keys()
    for k in theirs_params:
        assert rel_err(ours_params[k], theirs_params[k]) <= TOLERANCE["float32"], k
