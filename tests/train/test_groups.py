"""Per-rule training settings: each parameter group's learning rate and weight decay after one real step,
against a hand computation; a grouped run resumes to the uninterrupted run's weights."""

from __future__ import annotations

import io
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import models as tiny
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.trainer import default_loss

from adapterspec.adapters.install import apply
from adapterspec.adapters.loading import load_model
from adapterspec.errors import UserError
from adapterspec.train.loop import build_optimizer
from adapterspec.train.options import TrainOptions
from adapterspec.train.run import run

ROOT = Path(__file__).resolve().parents[2]
LLAMA = str(tiny.example_model_dir("tiny-llama"))
DATA = str(ROOT / "examples" / "data")
SPEC = """\
defaults lora(r=4, scale=2, loraplus=16)
layers[*].self_attn.<q,v>_proj: lora
layers[*].mlp.down_proj: lora(lr_scale=0.5, weight_decay=0.25)
layers[0].input_layernorm: full(lr_scale=0.1)
layers[-1].mlp.up_proj: lora(lr_scale=3)
norm: full
"""
LR = 0.01


def expected_lr_and_decay(path: str) -> tuple[float, float]:
    """The hand computation: the rule's lr_scale, times loraplus for B; the rule's weight decay, else the run's 0."""
    if path.startswith("model.layers.0.input_layernorm"):
        return LR * 0.1, 0.0
    if path.startswith("model.norm"):
        return LR, 0.0
    scale = 0.5 if ".mlp.down_proj." in path else 3.0 if ".mlp.up_proj." in path else 1.0
    loraplus = 16.0 if path.endswith("lora_b") else 1.0
    return LR * scale * loraplus, 0.25 if ".mlp.down_proj." in path else 0.0


def test_each_group_steps_with_its_own_learning_rate_and_weight_decay():
    model, _ = load_model(LLAMA)
    mx.random.seed(3)
    plan = apply(model, SPEC)
    # B starts at zero in LoRA; give it values so that weight decay shows
    for path, value in tree_flatten(model.trainable_parameters()):
        if path.endswith("lora_b"):
            model.load_weights([(path, mx.random.normal(value.shape) * 0.1)], strict=False)
    before = dict(tree_flatten(model.trainable_parameters()))
    options = TrainOptions(model=LLAMA, spec="x", data=DATA, optimizer="sgd", learning_rate=LR)
    optimizer = build_optimizer(options, plan, model.trainable_parameters())
    assert len(optimizer.optimizers) == 7  # six scaled groups and the run's

    batch = mx.array([[1, 40, 41, 42, 43, 44, 45, 46, 47, 2]])
    lengths = mx.array([[0, 10]])
    _, grads = nn.value_and_grad(model, default_loss)(model, batch, lengths)
    grads = dict(tree_flatten(grads))
    optimizer.update(model, _tree(grads))
    after = dict(tree_flatten(model.trainable_parameters()))

    assert set(before) == set(grads)
    for path in before:
        lr, decay = expected_lr_and_decay(path)
        lr32 = mx.array(lr, dtype=mx.float32)
        want = before[path] - lr32 * (grads[path] + decay * before[path])
        assert mx.allclose(after[path], want, rtol=1e-6, atol=1e-9).item(), path
        moved = after[path] - before[path]
        assert mx.any(moved != 0).item(), path


def _tree(flat: dict):
    from mlx.utils import tree_unflatten

    return tree_unflatten(list(flat.items()))


def test_the_run_learning_rate_and_schedules_scale_per_group():
    model, _ = load_model(LLAMA)
    plan = apply(model, SPEC)
    schedule = {"name": "linear_schedule", "arguments": [LR, 0.0, 10]}
    options = TrainOptions(model=LLAMA, spec="x", data=DATA, optimizer="sgd", lr_schedule=schedule)
    optimizer = build_optimizer(options, plan, model.trainable_parameters())
    optimizer.init(model.trainable_parameters())
    grads = {k: mx.zeros_like(v) for k, v in tree_flatten(model.trainable_parameters())}
    for _ in range(4):
        optimizer.update(model, _tree(grads))
    run_rate = optimizer.optimizers[-1].learning_rate.item()
    assert run_rate == pytest.approx(LR * (1 - 3 / 10))
    rates = sorted(o.learning_rate.item() / run_rate for o in optimizer.optimizers)
    assert rates == pytest.approx(sorted([0.1, 0.5, 8.0, 16.0, 3.0, 48.0, 1.0]))


def test_weight_decay_needs_an_optimizer_that_has_it():
    model, _ = load_model(LLAMA)
    plan = apply(model, SPEC)
    options = TrainOptions(model=LLAMA, spec="x", data=DATA, optimizer="adam")
    with pytest.raises(UserError, match="weight_decay .line 3. but the adam optimizer has none"):
        build_optimizer(options, plan, model.trainable_parameters())


def test_a_spec_without_per_rule_settings_keeps_one_optimizer():
    model, _ = load_model(LLAMA)
    plan = apply(model, "self_attn.q_proj: lora(r=4)\n")
    optimizer = build_optimizer(TrainOptions(model=LLAMA, spec="x", data=DATA), plan, model.trainable_parameters())
    assert not hasattr(optimizer, "optimizers")


def train(tmp_path: Path, name: str, **overrides):
    spec_path = tmp_path / "spec.aspec"
    spec_path.write_text(SPEC.replace("lora(lr_scale=0.5, weight_decay=0.25)", "lora(lr_scale=0.5, dropout=0.1)"))
    settings = dict(
        model=LLAMA, spec=str(spec_path), data=DATA, adapter_path=str(tmp_path / name), learning_rate=1e-3,
        iters=6, steps_per_report=3, steps_per_eval=1000, val_batches=1, save_every=3, optimizer="adamw",
    )  # fmt: skip
    return run(TrainOptions(**{**settings, **overrides}), stream=io.StringIO())


def test_a_grouped_run_resumes_to_the_uninterrupted_weights(tmp_path):
    whole = train(tmp_path, "whole")
    train(tmp_path, "parts", iters=3)
    resumed = train(tmp_path, "parts", resume=True)
    a = mx.load(str(whole.out / "adapters.safetensors"))
    b = mx.load(str(resumed.out / "adapters.safetensors"))
    assert a.keys() == b.keys()
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)
