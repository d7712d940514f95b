"""Adapter directories: our round trip, mlx-lm loading ours, us loading mlx-lm's, and refusals that
leave the model untouched."""

from __future__ import annotations

import json

import mlx.core as mx
import models as tiny
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tuner import dora as mlxlm_dora
from mlx_lm.tuner import lora as mlxlm_lora
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters

from adapterspec.adapters.install import apply, has_adapters
from adapterspec.adapters.weights import load_adapters, save_adapters
from adapterspec.errors import UserError
from adapterspec.model.adapter_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS

TOKENS = mx.array([[1, 5, 9, 2, 7, 3, 11]])
MLX_LM_ADAPTERS = (
    mlxlm_lora.LoRALinear, mlxlm_lora.LoRASwitchLinear, mlxlm_lora.LoRAEmbedding,
    mlxlm_dora.DoRALinear, mlxlm_dora.DoRAEmbedding,
)  # fmt: skip
OUR_ADAPTERS = {"LoRALinear", "LoRASwitchLinear", "LoRAEmbedding", "DoRALinear", "DoRAEmbedding", "DoRASwitchLinear"}


def build(arch="llama", quantized=False):
    return tiny.build(arch, quantization=tiny.Q4 if quantized else None)[0]


def randomize_trainable(model, seed=7):
    mx.random.seed(seed)
    model.update(tree_map(lambda v: v + 0.05 * mx.random.normal(v.shape), model.trainable_parameters()))


def adapted(arch, text, quantized=False):
    """A model with the spec applied and every trainable parameter moved away from its initial value."""
    model = build(arch, quantized)
    plan = apply(model, text)
    randomize_trainable(model)
    model.eval()
    return model, plan


def logits(model):
    model.eval()
    return model(TOKENS)


def close(a, b, atol=1e-4):
    return mx.allclose(a, b, atol=atol, rtol=1e-4).item()


def trainable_names(model):
    return {name for name, _ in tree_flatten(model.trainable_parameters())}


def our_adapted_paths(model):
    return {path for path, module in model.named_modules() if type(module).__name__ in OUR_ADAPTERS}


def mlx_lm_adapted_paths(model):
    return {path for path, module in model.named_modules() if isinstance(module, MLX_LM_ADAPTERS)}


def snapshot(model):
    params = dict(tree_flatten(model.parameters()))
    return (
        {name: id(value) for name, value in params.items()},
        {path: type(module).__name__ for path, module in model.named_modules()},
        trainable_names(model),
    )


def read_config(path):
    return json.loads((path / ADAPTER_CONFIG).read_text())


# ── our own round trip ───────────────────────────────────────────────────────────────────

ROUND_TRIPS = {
    "mixed-llama": ("llama", False, "defaults lora(r=4)\nlayers[*].self_attn.<q,v>_proj: lora\n"
                    "layers[-1].mlp: dora(r=2)\nembed_tokens: lora(r=3)\n**.*norm: full\n"),
    "moe-experts": ("qwen2_moe", False, "switch_mlp.*: lora(r=2)\nlayers[0]@linear: lora(r=4, alpha=8)\n"),
    "quantized": ("llama", True, "layers[-2:]: lora(r=4)\nembed_tokens: dora(r=2)\n"),
    "switch-dora": ("mixtral", False, "layers[*].block_sparse_moe: dora(r=2)\nq_proj: lora(r=4)\n"),
    "switch-dora-4bit": ("qwen2_moe", True, "layers[*].mlp: dora(r=2)\n"),
    "tied-embedding": ("gemma", False, "embed_tokens: lora(r=4)\nq_proj: lora\n"),
}  # fmt: skip


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_save_then_load_gives_the_same_outputs(tmp_path, name):
    arch, quantized, text = ROUND_TRIPS[name]
    model, plan = adapted(arch, text, quantized)
    save_adapters(model, plan, tmp_path / "adapters")
    fresh = build(arch, quantized)
    loaded = load_adapters(fresh, tmp_path / "adapters")
    assert [(e.path, e.adapter, e.r, e.scale) for e in loaded.entries] == [
        (e.path, e.adapter, e.r, e.scale) for e in plan.entries
    ]
    assert trainable_names(fresh) == trainable_names(model)
    assert mx.array_equal(logits(fresh), logits(model)).item()
    assert not close(logits(fresh), logits(build(arch, quantized)))


def test_the_directory_holds_full_path_weights_and_the_spec(tmp_path):
    text = "q_proj: lora(r=4)\n**.*norm: full\n"
    model, plan = adapted("llama", text)
    save_adapters(model, plan, tmp_path / "a")
    weights = mx.load(str(tmp_path / "a" / ADAPTER_WEIGHTS))
    assert set(weights) == trainable_names(model)
    assert "model.layers.0.self_attn.q_proj.lora_a" in weights
    ours = read_config(tmp_path / "a")["adapterspec"]
    assert ours["format"] == 1 and ours["spec"] == text
    assert [m["path"] for m in ours["plan"]["modules"]] == [e.path for e in plan.entries]


# ── mlx-lm loads ours when the plan fits its format ──────────────────────────────────────

MLX_LM_FITS = {
    "last-blocks": ("llama", False, "layers[-2:]: lora(r=4, scale=2.0)\n"),
    "dora-attention": ("llama", False, "layers[*].self_attn.<q,v>_proj: dora(r=4)\n"),
    "with-head": ("llama", False, "q_proj: lora(r=4)\nlm_head: lora(r=4)\n"),
    "experts-dropout": ("qwen2_moe", False, "layers[-1]: lora(r=2, dropout=0.1)\n"),
    "tied-embedding": ("gemma", False, "embed_tokens: lora(r=4)\nlayers[-1].self_attn.q_proj: lora(r=4)\n"),
    "quantized": ("llama", True, "layers[-1]: lora(r=4, alpha=16)\n"),
}


@pytest.mark.parametrize("name", MLX_LM_FITS)
def test_mlx_lm_loads_a_fitting_directory_and_computes_the_same(tmp_path, name):
    arch, quantized, text = MLX_LM_FITS[name]
    model, plan = adapted(arch, text, quantized)
    save_adapters(model, plan, tmp_path / "a")
    config = read_config(tmp_path / "a")
    assert config["adapterspec"]["mlx_lm_compatible"] is True
    assert {"fine_tune_type", "num_layers", "lora_parameters"} <= set(config)
    theirs = build(arch, quantized)
    mlx_lm_load_adapters(theirs, str(tmp_path / "a"))
    assert mlx_lm_adapted_paths(theirs) == {e.path for e in plan.entries}
    assert close(logits(theirs), logits(model))


MLX_LM_MISFITS = {
    "mixed-ranks": ("q_proj: lora(r=4)\nv_proj: lora(r=2)\n", "rank"),
    "mixed-scales": ("q_proj: lora(scale=1.0)\nv_proj: lora(scale=2.0)\n", "scale"),
    "mixed-dropout": ("q_proj: lora(dropout=0.1)\nv_proj: lora\n", "dropout"),
    "full": ("q_proj: lora\n**.*norm: full\n", "full"),
    "first-block": ("layers[0]: lora\n", "last num_layers blocks"),
    "other-keys-per-block": ("q_proj: lora\nlayers[-1].self_attn.v_proj: lora\n", "last num_layers blocks"),
    "lora-and-dora": ("q_proj: lora\nv_proj: dora\n", "mixes lora and dora"),
}


@pytest.mark.parametrize("name", MLX_LM_MISFITS)
def test_a_directory_mlx_lm_cannot_express_says_why(tmp_path, name):
    text, reason = MLX_LM_MISFITS[name]
    model, plan = adapted("llama", text)
    save_adapters(model, plan, tmp_path / "a")
    config = read_config(tmp_path / "a")
    assert config["adapterspec"]["mlx_lm_compatible"] is False
    assert any(reason in r for r in config["adapterspec"]["mlx_lm_incompatible_because"])
    assert not {"fine_tune_type", "num_layers", "lora_parameters"} & set(config)
    with pytest.raises(Exception):  # noqa: B017 (mlx-lm refuses, with whatever error it raises)
        mlx_lm_load_adapters(build(), str(tmp_path / "a"))
    fresh = build()
    load_adapters(fresh, tmp_path / "a")
    assert mx.array_equal(logits(fresh), logits(model)).item()


def test_a_switch_dora_directory_says_mlx_lm_has_no_dora_on_experts(tmp_path):
    model, plan = adapted("mixtral", "layers[*].block_sparse_moe.switch_mlp.*: dora(r=2)\n")
    assert {e.adapter for e in plan.entries} == {"switch-dora"}
    save_adapters(model, plan, tmp_path / "a")
    config = read_config(tmp_path / "a")
    assert config["adapterspec"]["mlx_lm_compatible"] is False
    assert any("switch-dora" in r and "mlx-lm" in r for r in config["adapterspec"]["mlx_lm_incompatible_because"])
    assert not {"fine_tune_type", "num_layers", "lora_parameters"} & set(config)
    with pytest.raises(Exception):  # noqa: B017 (mlx-lm refuses, with whatever error it raises)
        mlx_lm_load_adapters(build("mixtral"), str(tmp_path / "a"))
    fresh = build("mixtral")
    load_adapters(fresh, tmp_path / "a")
    assert {type(m).__name__ for _, m in fresh.named_modules()} >= {"DoRASwitchLinear"}
    assert {k.rsplit(".", 1)[1] for k in trainable_names(fresh)} == {"lora_a", "lora_b", "m"}
    assert mx.array_equal(logits(fresh), logits(model)).item()


# ── we load mlx-lm's directories ─────────────────────────────────────────────────────────


def write_mlx_lm_dir(model, path, num_layers, lora_parameters, fine_tune_type="lora"):
    """What `mlx_lm.lora` leaves behind: its adapter layers, trained weights, and its config keys."""
    model.freeze()
    linear_to_lora_layers(model, num_layers, lora_parameters, use_dora=fine_tune_type == "dora")
    randomize_trainable(model)
    path.mkdir()
    mx.save_safetensors(str(path / ADAPTER_WEIGHTS), dict(tree_flatten(model.trainable_parameters())))
    config = {
        "model": "tiny", "fine_tune_type": fine_tune_type, "num_layers": num_layers,
        "lora_parameters": lora_parameters, "batch_size": 4, "iters": 10, "learning_rate": 1e-5,
    }  # fmt: skip
    (path / ADAPTER_CONFIG).write_text(json.dumps(config))
    return path


MLX_LM_DIRS = {
    "keys-q-v": ("llama", 2, {"rank": 4, "scale": 10.0, "dropout": 0.0,
                              "keys": ["self_attn.q_proj", "self_attn.v_proj"]}, "lora"),
    "all-blocks-dora": ("llama", -1, {"rank": 2, "scale": 20.0, "dropout": 0.0}, "dora"),
    "experts": ("qwen2_moe", 1, {"rank": 2, "scale": 5.0, "dropout": 0.05}, "lora"),
    "embedding-and-head": ("llama", 1, {"rank": 4, "scale": 1.0, "dropout": 0.0,
                                        "keys": ["model.embed_tokens", "lm_head", "mlp.down_proj"]}, "lora"),
    "tied-embedding": ("gemma", 4, {"rank": 4, "scale": 2.0, "dropout": 0.0,
                                    "keys": ["model.embed_tokens", "self_attn.o_proj"]}, "lora"),
}  # fmt: skip


@pytest.mark.parametrize("name", MLX_LM_DIRS)
def test_we_load_a_directory_written_by_mlx_lm(tmp_path, name):
    arch, num_layers, parameters, kind = MLX_LM_DIRS[name]
    theirs = build(arch)
    write_mlx_lm_dir(theirs, tmp_path / "a", num_layers, parameters, kind)
    ours = build(arch)
    plan = load_adapters(ours, tmp_path / "a")
    assert our_adapted_paths(ours) == mlx_lm_adapted_paths(theirs) == {e.path for e in plan.entries}
    assert trainable_names(ours) == trainable_names(theirs)
    assert close(logits(ours), logits(theirs))


# ── refusals leave the model as it was ───────────────────────────────────────────────────


@pytest.fixture
def saved(tmp_path):
    model, plan = adapted("llama", "<q,v>_proj: lora(r=4)\nlayers[-1].mlp: dora(r=2)\n")
    return save_adapters(model, plan, tmp_path / "a")


def rewrite_weights(path, change):
    weights = mx.load(str(path / ADAPTER_WEIGHTS))
    change(weights)
    mx.save_safetensors(str(path / ADAPTER_WEIGHTS), weights)


def assert_refused(path, match, **kwargs):
    model = build()
    before = snapshot(model)
    with pytest.raises(UserError, match=match):
        load_adapters(model, path, **kwargs)
    assert snapshot(model) == before
    assert not has_adapters(model)


def test_wrong_shapes_are_refused(saved):
    rewrite_weights(saved, lambda w: w.update({"model.layers.0.self_attn.q_proj.lora_a": mx.zeros((3, 3))}))
    assert_refused(saved, "has shape")


def test_unknown_tensors_are_refused(saved):
    rewrite_weights(saved, lambda w: w.update({"model.layers.0.self_attn.k_proj.lora_a": mx.zeros((64, 4))}))
    assert_refused(saved, "not an adapter parameter")


def test_missing_tensors_are_refused_unless_not_strict(saved):
    rewrite_weights(saved, lambda w: w.pop("model.layers.2.self_attn.v_proj.lora_b"))
    assert_refused(saved, "missing")
    model = build()
    load_adapters(model, saved, strict=False)
    assert has_adapters(model)


def test_a_missing_weights_file_is_refused(saved):
    (saved / ADAPTER_WEIGHTS).unlink()
    assert_refused(saved, ADAPTER_WEIGHTS)


@pytest.mark.parametrize("content", [b"", b"garbage", b"\xff" * 64])
def test_an_unreadable_weights_file_is_refused(saved, content):
    (saved / ADAPTER_WEIGHTS).write_bytes(content)
    assert_refused(saved, "not a readable safetensors file")


def test_a_missing_config_is_refused(saved):
    (saved / ADAPTER_CONFIG).unlink()
    assert_refused(saved, ADAPTER_CONFIG)


def test_a_broken_config_is_refused(saved):
    (saved / ADAPTER_CONFIG).write_text("{not json")
    assert_refused(saved, "not valid JSON")


def test_a_full_fine_tune_directory_is_refused(saved):
    (saved / ADAPTER_CONFIG).write_text(json.dumps({"fine_tune_type": "full", "num_layers": 4}))
    assert_refused(saved, "full fine-tune")


def test_adapters_made_for_another_model_are_refused(tmp_path):
    model = tiny.build("llama", num_hidden_layers=6)[0]
    plan = apply(model, "layers[*].self_attn.q_proj: lora(r=4)\n")
    save_adapters(model, plan, tmp_path / "a")
    assert_refused(tmp_path / "a", "another model")


def test_a_model_that_already_has_adapters_is_refused(saved):
    model = build()
    apply(model, "k_proj: lora(r=2)\n")
    before = snapshot(model)
    with pytest.raises(UserError, match="already has adapters"):
        load_adapters(model, saved)
    assert snapshot(model) == before


# ── mlx-lm's own loading path (mlx_lm.generate / mlx_lm.utils.load) ─────────────────────


def test_mlx_lm_load_with_adapter_path_accepts_our_directory(tmp_path):
    from mlx_lm import generate
    from mlx_lm.utils import load

    model_dir = tiny.example_model_dir("tiny-llama")
    model, _config = tiny.load(model_dir)
    plan = apply(model, "layers[-2:].self_attn.<q,v>_proj: lora(r=4, scale=4.0)\n")
    randomize_trainable(model)
    save_adapters(model, plan, tmp_path / "a")
    loaded, tokenizer = load(str(model_dir), adapter_path=str(tmp_path / "a"))
    assert mlx_lm_adapted_paths(loaded) == {e.path for e in plan.entries}
    assert close(logits(loaded), logits(model))
    text = generate(loaded, tokenizer, prompt="The quick brown fox", max_tokens=4)
    assert isinstance(text, str)


@pytest.mark.parametrize("kind", ["lora(r=4, dropout=0.5)", "dora(r=4, dropout=0.5)"])
def test_loaded_adapters_are_in_eval_mode_as_mlx_lm_loads_them(tmp_path, kind):
    from mlx_lm.utils import load

    model_dir = tiny.example_model_dir("tiny-llama")
    model, _config = tiny.load(model_dir)
    plan = apply(model, f"layers[*].self_attn.<q,v>_proj: {kind}\n")
    randomize_trainable(model)
    save_adapters(model, plan, tmp_path / "a")
    fresh, _config = tiny.load(model_dir)
    fresh.train()
    load_adapters(fresh, tmp_path / "a")
    first, second = logits(fresh), logits(fresh)
    assert mx.array_equal(first, second).item()  # dropout is off
    theirs, _tokenizer = load(str(model_dir), adapter_path=str(tmp_path / "a"))
    assert close(first, logits(theirs))
