"""The merged path of a quantized base, in the compiled step mlx-lm's trainer runs, keeps no dequantized weight
from the forward pass to the backward: a compiled function merges equal operations, so the backward's copy must be
an operation of its own."""

import gc
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import models as tiny

from adapterspec.adapters import lowrank
from adapterspec.adapters.basemodules import dense_weight
from adapterspec.adapters.install import apply

BLOCKS = 8
SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=BLOCKS, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512)  # fmt: skip
SPEC = "layers[*].<self_attn,mlp>.*_proj: lora(r=8)\n"


def compiled_step_peak(model, tokens) -> int:
    """Peak memory of one call of mlx-lm trainer's compiled step (Adam) after a warm-up call."""

    def loss(model, x):
        return nn.losses.cross_entropy(model(x[:, :-1]), x[:, 1:]).mean()

    value_and_grad = nn.value_and_grad(model, loss)
    optimizer = optim.Adam(learning_rate=1e-5)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x):
        value, grad = value_and_grad(model, x)
        optimizer.update(model, grad)
        return value

    mx.eval(step(tokens), state)
    gc.collect()
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    mx.eval(step(tokens), state)
    return mx.get_peak_memory()


def adapted_step_peak(path: str, monkeypatch) -> tuple[int, int]:
    """The compiled step's peak on `path` for a 4-bit llama with LoRA on every linear, and one block's weights
    dequantized (bytes)."""
    monkeypatch.setattr(lowrank, "merge_mode", path)
    gc.collect()
    model = tiny.build("llama", quantization=tiny.Q4, **SHAPE)[0]
    plan = apply(model, SPEC)
    modules = dict(model.named_modules())
    one_block = sum(dense_weight(modules[e.path].linear).nbytes for e in plan.entries) // BLOCKS
    tokens = mx.random.randint(0, SHAPE["vocab_size"], (1, 17), key=mx.random.key(0))
    return compiled_step_peak(model, tokens), one_block


def test_compiled_step_keeps_no_dequantized_weight_for_the_backward(monkeypatch):
    separate, one_block = adapted_step_peak("never", monkeypatch)
    merged, _ = adapted_step_peak("always", monkeypatch)
    # The merged path holds a layer's dequantized and merged weights while the layer runs (forward, then backward):
    # about one block's worth. Kept from the forward to the backward, they would add every block's.
    assert merged - separate < 2 * one_block
