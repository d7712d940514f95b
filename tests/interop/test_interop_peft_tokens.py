"""PEFT's trainable_token_indices and init_lora_weights with real PEFT and transformers: imported as tokens([...])
rules whose adapted MLX model gives PEFT's logits, exported back so that PEFT gives the same logits again."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from adapterspec.interop.peft import export_peft, import_peft, write_imported_adapters  # noqa: E402

LOGITS_ATOL = 1e-5
TOKENS = [[1, 5, 7, 300, 9, 301, 2, 4, 100, 17]]


def hf_dir(tmp_path, tied: bool):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=320, tie_word_embeddings=tied,
    )  # fmt: skip
    path = tmp_path / ("tied" if tied else "untied")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def hf_model(path):
    return transformers.LlamaForCausalLM.from_pretrained(path).eval()


def logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def mlx_logits(model) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array(TOKENS)).astype(mx.float32))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_trainable_token_indices_round_trip(tmp_path, tied):
    from adapterspec.adapters.loading import load_model
    from adapterspec.adapters.weights import load_adapters

    base = hf_dir(tmp_path, tied)
    torch.manual_seed(1)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], trainable_token_indices=[5, 300, 301])
    model = peft.get_peft_model(hf_model(base), config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "trainable_tokens_delta" in name or "lora_B" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(tmp_path / "peft")
    want = logits(model)
    assert np.abs(want - logits(hf_model(base))).max() > 1e-3

    imported = import_peft(tmp_path / "peft", str(base), need_model=True)
    assert "embed_tokens: tokens([5, 300, 301])" in imported.text
    assert not [f for f in imported.findings if f.lossy]
    write_imported_adapters(imported, tmp_path / "peft", tmp_path / "ours")
    ours, _ = load_model(base)
    load_adapters(ours, tmp_path / "ours")
    np.testing.assert_allclose(mlx_logits(ours), want, atol=LOGITS_ATOL, rtol=1e-6)

    export_peft(str(base), tmp_path / "ours", tmp_path / "exported")
    exported = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
    assert exported["trainable_token_indices"] == [5, 300, 301]
    reloaded = peft.PeftModel.from_pretrained(hf_model(base), tmp_path / "exported").eval()
    np.testing.assert_allclose(logits(reloaded), want, atol=LOGITS_ATOL, rtol=1e-6)


def test_export_says_which_training_settings_peft_cannot_carry_and_keeps_gaussian(tmp_path):
    from adapterspec.adapters.install import apply
    from adapterspec.adapters.loading import load_model
    from adapterspec.adapters.weights import save_adapters

    base = hf_dir(tmp_path, False)
    model, _ = load_model(base)
    plan = apply(model, "defaults lora(r=2, init=gaussian, loraplus=16)\nq_proj: lora(lr_scale=0.5)\n")
    save_adapters(model, plan, tmp_path / "ours")
    exported, findings = export_peft(str(base), tmp_path / "ours", tmp_path / "exported")
    assert exported["init_lora_weights"] == "gaussian" and exported["trainable_token_indices"] is None
    assert any("loraplus, lr_scale set how the adapters trained" in f.message for f in findings)


def test_a_config_alone_translates_init_and_token_rows():
    from adapterspec.interop.peft_import import translate
    from adapterspec.language.lint import lint_text

    config = {
        "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "init_lora_weights": "gaussian",
        "trainable_token_indices": {"embed_tokens": [1, 2, 3, 9]},
    }  # fmt: skip
    text = translate(config).text
    assert "defaults lora(r=4, alpha=8, init=gaussian)" in text.splitlines()
    assert text.splitlines()[-1] == "embed_tokens: tokens([1:4, 9])"
    assert not [d for d in lint_text(text) if d.is_error]


def test_a_pissa_adapter_reaches_peft_as_a_plain_delta_on_the_original_weights(tmp_path):
    import mlx.core as mx

    from adapterspec.adapters.install import apply
    from adapterspec.adapters.loading import load_model
    from adapterspec.adapters.weights import save_adapters

    base = hf_dir(tmp_path, False)
    model, _ = load_model(base)
    mx.random.seed(2)
    plan = apply(model, "self_attn.<q_proj,v_proj>: lora(r=2, alpha=4, init=pissa)\nmlp.down_proj: lora(init=olora)\n")
    for layer in model.model.layers:  # as if trained: A and B moved away from the principal factors
        for module in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.down_proj):
            module.lora_a = module.lora_a + 0.05 * mx.random.normal(module.lora_a.shape)
            module.lora_b = module.lora_b + 0.05 * mx.random.normal(module.lora_b.shape)
    model.eval()
    want = mlx_logits(model)
    save_adapters(model, plan, tmp_path / "ours")
    exported, _ = export_peft(str(base), tmp_path / "ours", tmp_path / "exported")
    assert exported["r"] == 4 and exported["init_lora_weights"] is True
    reloaded = peft.PeftModel.from_pretrained(hf_model(base), tmp_path / "exported").eval()
    np.testing.assert_allclose(logits(reloaded), want, atol=LOGITS_ATOL, rtol=1e-6)
