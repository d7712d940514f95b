"""Initialisations (gaussian, PiSSA, OLoRA) and token rows, trained for real: the saved directory is a plain delta on
the original weights that mlx-lm, `load_adapters` and the fuse read as the trained model; only listed rows change."""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlx.core as mx
import models as tiny
import pytest
from mlx.utils import tree_flatten

from adapterspec.adapters.install import apply
from adapterspec.adapters.loading import load_model
from adapterspec.adapters.weights import load_adapters
from adapterspec.fuse.run import fuse_model_dir
from adapterspec.train.options import TrainOptions
from adapterspec.train.run import run

ROOT = Path(__file__).resolve().parents[2]
LLAMA = str(tiny.example_model_dir("tiny-llama"))
DATA = str(ROOT / "examples" / "data")
IDS = mx.array([[1, 40, 318, 41, 319, 42, 43, 2]])
ALL = """\
defaults lora(r=4, alpha=8, init=pissa, loraplus=4)
layers[*].self_attn.<q,v>_proj: lora
layers[*].mlp.down_proj: lora(init=olora, lr_scale=0.5)
layers[*].mlp.up_proj: lora(init=gaussian)
embed_tokens: tokens([318, 319], lr_scale=2)
**.*norm: full(lr_scale=0.1)
"""


def train(tmp_path: Path, spec: str, name: str = "run", **overrides):
    spec_path = tmp_path / f"{name}.aspec"
    spec_path.write_text(spec)
    settings = dict(
        model=LLAMA, spec=str(spec_path), data=DATA, adapter_path=str(tmp_path / name), learning_rate=3e-3,
        iters=4, steps_per_report=2, steps_per_eval=1000, val_batches=1, save_every=2,
    )  # fmt: skip
    return run(TrainOptions(**{**settings, **overrides}), stream=io.StringIO())


def logits(model) -> mx.array:
    model.eval()
    return model(IDS)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("trained")
    result = train(tmp_path, ALL)
    return result, logits(result.model)


def test_a_base_changing_init_starts_as_the_base_model_and_moves_the_principal_part():
    model, _ = load_model(LLAMA)
    original = logits(model)
    weight = model.model.layers[0].self_attn.q_proj.weight
    down = model.model.layers[0].mlp.down_proj.weight
    mx.random.seed(0)
    apply(model, ALL)
    assert mx.allclose(logits(model), original, atol=1e-5).item()
    q = model.model.layers[0].self_attn.q_proj
    residual_singular = mx.linalg.svd(q.linear.weight, stream=mx.cpu)[1]
    singular = mx.linalg.svd(weight, stream=mx.cpu)[1]
    # PiSSA: the residual keeps W's singular values from the (r+1)-th on
    assert mx.allclose(residual_singular[:-4], singular[4:], rtol=1e-4, atol=1e-5).item()
    assert mx.allclose(mx.max(residual_singular), singular[4], rtol=1e-4).item()
    # OLoRA: B0 (r, out) has orthonormal rows, and W − scale·(A0·B0)ᵀ is the residual
    d = model.model.layers[0].mlp.down_proj
    assert mx.allclose(d.lora_b @ d.lora_b.T, mx.eye(4), atol=1e-5).item()
    assert mx.allclose(d.linear.weight + d.scale * (d.lora_a @ d.lora_b).T, down, atol=1e-5).item()
    # gaussian: A from N(0, 1/r²), B zero
    up = model.model.layers[0].mlp.up_proj
    assert abs(mx.std(up.lora_a).item() - 1 / 4) < 0.05 and not mx.any(up.lora_b).item()


def test_the_saved_directory_is_a_plain_delta_on_the_original_weights(trained):
    result, expected = trained
    saved = mx.load(str(result.out / "adapters.safetensors"))
    assert saved["model.layers.0.self_attn.q_proj.lora_a"].shape == (64, 8)  # r=4 saved at rank 8
    assert saved["model.layers.0.mlp.up_proj.lora_a"].shape[1] == 4  # gaussian does not change the base
    assert saved["model.embed_tokens.token_rows"].shape == (2, 64)  # the rows alone
    config = json.loads((result.out / "adapter_config.json").read_text())["adapterspec"]
    assert {"path": "model.layers.0.self_attn.q_proj", "init": "pissa", "r": 4} in config["converted_to_plain_lora"]
    assert config["training_settings_not_in_mlx_lm_config"] == ["loraplus", "lr_scale"]

    reloaded, _ = load_model(LLAMA)
    load_adapters(reloaded, result.out)
    assert mx.allclose(logits(reloaded), expected, atol=1e-5).item()


def test_fused_original_plus_converted_adapters_equals_the_trained_model(trained, tmp_path):
    result, expected = trained
    fuse_model_dir(LLAMA, result.out, tmp_path / "fused")
    fused, _ = load_model(tmp_path / "fused")
    assert mx.allclose(logits(fused), expected, atol=1e-5).item()
    base, _ = load_model(LLAMA)
    before, after = base.model.embed_tokens.weight, fused.model.embed_tokens.weight
    changed = mx.any(before != after, axis=1).tolist()
    assert [row for row, moved in enumerate(changed) if moved] == [318, 319]
    trained_rows = result.model.model.embed_tokens.token_rows
    assert mx.array_equal(after[mx.array([318, 319])], trained_rows).item()


def test_mlx_lm_loads_a_pissa_directory_as_the_trained_model(tmp_path):
    from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters

    result = train(tmp_path, "self_attn.<q,v>_proj: lora(r=4, scale=2, init=olora)\n")
    config = json.loads((result.out / "adapter_config.json").read_text())
    assert config["adapterspec"]["mlx_lm_compatible"] and config["lora_parameters"]["rank"] == 8
    model, _ = load_model(LLAMA)
    mlx_lm_load_adapters(model, str(result.out))
    assert mx.allclose(logits(model), logits(result.model), atol=1e-5).item()


def test_token_rows_train_only_their_rows_also_through_a_tied_head():
    model, _ = tiny.build("llama", tie_word_embeddings=True)
    reference, _ = tiny.build("llama", tie_word_embeddings=True)
    plan = apply(model, "embed_tokens: tokens([3, 7:9])\n")
    assert [e.adapter for e in plan.entries] == ["embedding-tokens"]
    assert mx.allclose(logits(model), logits(reference)).item()
    values = mx.random.normal((3, model.model.embed_tokens.token_rows.shape[1]))
    model.model.embed_tokens.token_rows = values
    weight = reference.model.embed_tokens.weight
    weight[mx.array([3, 7, 8])] = values
    reference.model.embed_tokens.weight = weight
    assert mx.allclose(logits(model), logits(reference), atol=1e-5).item()
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert names == ["model.embed_tokens.token_rows"]


def test_a_run_with_every_per_rule_setting_resumes_to_the_uninterrupted_weights(tmp_path):
    whole = train(tmp_path, ALL, "whole", optimizer="adamw")
    train(tmp_path, ALL, "parts", iters=2, optimizer="adamw")
    resumed = train(tmp_path, ALL, "parts", resume=True, optimizer="adamw")
    a = mx.load(str(whole.out / "adapters.safetensors"))
    b = mx.load(str(resumed.out / "adapters.safetensors"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)
