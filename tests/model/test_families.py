"""What the headers cannot tell: the families given to modules that look like a Linear, a SwitchLinear or
an Embedding from their weights alone (the zoo's causes 1, 2, 3 and 5), without mlx."""

from __future__ import annotations

from adapterspec.model.families import ConfigHints, bare_weight_class, is_embedding_path, is_multi_linear
from adapterspec.model.index import ModuleIndex, _tied_embeddings, infos_from_tensors, tie_flag

F32 = "float32"


def _index(tensors: dict, config: dict | None = None) -> dict:
    return {m.path: m for m in infos_from_tensors({k: (F32, s) for k, s in tensors.items()}, config or {})}


def test_mla_multilinear_is_no_switch():
    config = {"model_type": "deepseek_v3", "kv_lora_rank": 16, "q_lora_rank": None}
    infos = _index(
        {
            "model.layers.0.self_attn.embed_q.weight": (4, 16, 8),
            "model.layers.0.self_attn.unembed_out.weight": (4, 16, 16),
            "model.layers.0.mlp.switch_mlp.up_proj.weight": (4, 32, 64),
        },
        config,
    )
    for name in ("embed_q", "unembed_out"):
        info = infos[f"model.layers.0.self_attn.{name}"]
        assert (info.cls, info.family, info.adaptable) == ("MultiLinear", "leaf", False)
    assert infos["model.layers.0.mlp.switch_mlp.up_proj"].family == "switch"
    # named embed_q without an MLA config, it is still MLA's; a 3-D weight elsewhere stays a SwitchLinear
    assert is_multi_linear("a.embed_q", 3, ConfigHints())
    assert not is_multi_linear("a.experts.w1", 3, ConfigHints.from_config(config))
    assert not is_multi_linear("a.switch_mlp.w1", 3, ConfigHints())


def test_quantized_multilinear_is_no_switch():
    infos = infos_from_tensors(
        {
            "m.self_attn.embed_q.weight": ("uint32", (4, 16, 1)),
            "m.self_attn.embed_q.scales": (F32, (4, 16, 1)),
            "m.self_attn.embed_q.biases": (F32, (4, 16, 1)),
        },
        {"kv_lora_rank": 8, "quantization": {"bits": 4, "group_size": 8}},
    )
    (info,) = [m for m in infos if m.path == "m.self_attn.embed_q"]
    assert (info.cls, info.family) == ("QuantizedMultiLinear", "leaf")


def test_bare_2d_weights_that_are_no_linear():
    deepseek = ConfigHints.from_config({"model_type": "deepseek", "n_routed_experts": 4})
    assert bare_weight_class("model.layers.1.mlp.gate", (4, 64), None, deepseek) == "MoEGate"
    # mixtral's gate is an nn.Linear of the same shape: a Linear
    assert bare_weight_class("model.layers.1.block_sparse_moe.gate", (4, 64), None, ConfigHints()) is None
    loop = ConfigHints.from_config({"model_type": "iquestloopcoder"})
    assert bare_weight_class("model.gate_projections.0", (4, 16), (4,), loop) == "LoopGateProjection"
    # LayerNormPerHead: a 2-D weight and a 2-D bias (a Linear's bias is 1-D)
    assert bare_weight_class("model.layers.0.attn.g_norm", (4, 16), (4, 16), ConfigHints()) == "Norm"
    assert bare_weight_class("model.layers.0.attn.g", (4, 16), (4, 16), ConfigHints()) == "Leaf"
    assert bare_weight_class("model.layers.0.attn.q_proj", (4, 16), (4,), ConfigHints()) is None
    infos = _index({"model.layers.0.mlp.gate.weight": (4, 64)}, {"text_config": {"model_type": "deepseek_v2"}})
    assert infos["model.layers.0.mlp.gate"].family == "leaf"


def test_embedding_lists_are_embeddings():
    infos = _index({"model.ngram_embeddings.embedders.0.weight": (32, 8), "model.unembed_proj.0.weight": (8, 4)})
    assert infos["model.ngram_embeddings.embedders.0"].family == "embedding"
    assert infos["model.ngram_embeddings.embedders.0"].input_dims == 32
    assert not is_embedding_path("model.language_model.altup_unembed_projections.0", frozenset())
    assert not is_embedding_path("gpt_neox.embed_out", frozenset())


def test_tied_structure_wins_over_the_flag():
    infos = infos_from_tensors({"model.embed_tokens.weight": (F32, (32, 8)), "model.norm.weight": (F32, (8,))})
    assert _tied_embeddings(infos, False) and _tied_embeddings(infos, None)
    with_head = infos + infos_from_tensors({"lm_head.weight": (F32, (32, 8))})
    assert not _tied_embeddings(with_head, True)
    assert tie_flag({}, {"tie_word_embeddings": False}) is False
    assert tie_flag({"tie_word_embeddings": None}, {"tie_word_embeddings": True}) is True
    assert tie_flag({}, None) is None


def test_hints_read_text_config():
    hints = ConfigHints.from_config(
        {"model_type": "kimi_vl", "text_config": {"model_type": "deepseek_v3", "kv_lora_rank": 8}}
    )
    assert hints.model_types == {"kimi_vl", "deepseek_v3"} and hints.mla
    assert not ConfigHints.from_config({"kv_lora_rank": True}).mla
    assert ModuleIndex  # the public name the families feed


def test_modules_whose_weight_the_model_reads_are_not_mlx_lm_loadable():
    from adapterspec.language.lint import parse_spec
    from adapterspec.model.index import ModuleInfo
    from adapterspec.model.mlxlm import mlx_lm_config
    from adapterspec.model.plan import make_plan

    infos = [ModuleInfo("model", "Model", "container"), ModuleInfo("model.layers", "list", "list"), ModuleInfo("model.layers.0", "Block", "container"),
             ModuleInfo("model.layers.0.altup", "AltUp", "container"),
             ModuleInfo("model.layers.0.altup.prediction_coefs", "Linear", "linear", 4, 16, has_params=True),
             ModuleInfo("model.layers.0.q_proj", "Linear", "linear", 8, 8, has_params=True)]  # fmt: skip
    for model_type, compatible in (("gemma3n", False), ("llama", True)):
        index = ModuleIndex(infos, model_type=model_type)
        fit = mlx_lm_config(make_plan(parse_spec("layers[-1:].**: lora(r=2)\n"), index), index)
        assert fit.compatible is compatible, fit.reasons
        if not compatible:
            assert "altup.prediction_coefs" in fit.reasons[0] and ".weight" in fit.reasons[0]
