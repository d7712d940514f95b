"""Generate tests/zoo/configs.json: one tiny config per text architecture of the installed mlx-lm.

Run `python tests/zoo/make_configs.py` (add `--check` to build every model and print what fails).
The generic part fills each `ModelArgs` field whose name it knows with a tiny size; `OVERRIDES` holds
the hand fixes for architectures that need special fields. The output is data: the tests read only
configs.json, so edit OVERRIDES and regenerate, or edit the JSON by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import pkgutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs.json"

# Tiny values for the field names mlx-lm's ModelArgs use.
TINY = {
    # widths
    "hidden_size": 64,
    "dim": 64,
    "d_model": 64,
    "n_embd": 64,
    "model_dim": 64,
    "embed_dim": 64,
    "intermediate_size": 128,
    "ffn_dim": 128,
    "ffn_hidden_size": 128,
    "n_inner": 128,
    "dim_ff": 128,
    "hidden_dim": 128,
    "moe_intermediate_size": 32,
    "expert_intermediate_size": 32,
    "moe_ffn_hidden_size": 32,
    "shared_expert_intermediate_size": 64,
    "moe_shared_expert_intermediate_size": 64,
    "head_dim": 16,
    "kv_channels": 16,
    "attention_head_dim": 16,
    # depth
    "num_hidden_layers": 2,
    "n_layer": 2,
    "n_layers": 2,
    "num_layers": 2,
    "num_transformer_layers": 2,
    # heads
    "num_attention_heads": 4,
    "n_head": 4,
    "n_heads": 4,
    "num_heads": 4,
    "num_key_value_heads": 2,
    "n_kv_heads": 2,
    "num_kv_heads": 2,
    "multi_query_group_num": 2,
    # vocabulary and positions
    "vocab_size": 128,
    "n_positions": 512,
    "max_position_embeddings": 512,
    "n_ctx": 512,
    "max_seq_len": 512,
    "seq_length": 512,
    # experts
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_k": 2,
    "moe_topk": 2,
    "top_k": 2,
    "moe_top_k": 2,
    "num_experts_per_token": 2,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "moe_num_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    # multi-head latent attention
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    # norms and rope
    "rms_norm_eps": 1e-5,
    "layer_norm_epsilon": 1e-5,
    "layer_norm_eps": 1e-5,
    "norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5,
    "rotary_pct": 0.5,
    "rotary_dim": 8,
    "rotary_emb_base": 10000,
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "block_dim": 64,
    "block_ff_dim": 128,
    "conv_L_cache": 3,
    "block_multiple_of": 16,
    "block_ffn_dim_multiplier": 1.0,
    "routed_scaling_factor": 1.0,
    "linear_conv_kernel_dim": 4,
    "full_attention_interval": 2,
}
TYPE_DEFAULTS = {"int": 2, "float": 1e-5, "bool": False, "str": "", "dict": {}, "list": []}

# Hand fixes: merged last (None deletes a key).
SW = ["sliding_attention", "full_attention"]
YARN = {
    "type": "yarn",
    "rope_type": "yarn",
    "factor": 1.0,
    "original_max_position_embeddings": 512,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 0.0,
}
KEEP_NONE = "<null>"  # an override that writes null (None alone deletes the key)
GRANITE = {
    "attention_multiplier": 0.25,
    "embedding_multiplier": 12.0,
    "logits_scaling": 8.0,
    "residual_multiplier": 0.22,
}
MINICPM = {"scale_depth": 1.4, "scale_emb": 12.0, "dim_model_base": 32}
OVERRIDES: dict[str, dict] = {
    # required fields the type defaults would fill with meaningless sizes or scales
    "granite": GRANITE,
    "granitemoe": GRANITE,
    "minicpm": MINICPM,
    "minicpm3": {**MINICPM, "rope_scaling": YARN},
    "phi3small": {"gegelu_limit": 20.0, "ff_intermediate_size": 128},
    "glm4_moe": {"rope_scaling": KEEP_NONE},
    "Klear": {"decoder_sparse_step": 1},
    "qwen3_moe": {"decoder_sparse_step": 1},
    "qwen3_next": {"decoder_sparse_step": 1},
    "llama4_text": {"intermediate_size_mlp": 128, "no_rope_layers": [1, 1]},
    "minimax": {"shared_intermediate_size": 64},
    "nemotron": {"hidden_act": "relu2"},
    "granitemoehybrid": {
        **GRANITE,
        "layer_types": ["mamba", "attention"],
        "mamba_n_heads": 4,
        "mamba_d_head": 32,
        "mamba_d_state": 16,
        "mamba_d_conv": 4,
        "mamba_n_groups": 1,
        "mamba_expand": 2,
        "mamba_proj_bias": False,
        "mamba_conv_bias": True,
        "mamba_chunk_size": 64,
        "shared_intermediate_size": 64,
    },
    "gemma": {"tie_word_embeddings": True},
    "afmoe": {"layer_types": SW},
    "cohere2": {"sliding_window_pattern": 2},
    "gemma3_text": {"sliding_window_pattern": 2},
    "gemma3": {"text_config": {"sliding_window_pattern": 2, "model_type": "gemma3_text"}},
    "olmo3": {"layer_types": SW},
    "mellum": {
        "layer_types": SW,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    },
    "spark2_5": {
        "layer_types": SW,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    },
    "openelm": {
        "num_query_heads": [4, 4],
        "num_kv_heads": [2, 2],
        "ffn_multipliers": [2.0, 2.0],
        "num_transformer_layers": 2,
    },
    "jamba": {"layers_block_type": ["attention", "mamba"]},
    "hunyuan": {"rope_scaling": {"alpha": 1.0, "factor": 1.0, "type": "dynamic"}},
    "deepseek_v2": {"rope_scaling": YARN},
    "dbrx": {
        "ffn_config": {"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2},
        "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
    },
    "nemotron_h": {"hybrid_override_pattern": "M*-E", "num_hidden_layers": 4},
    "exaone4": {"sliding_window_pattern": "LG"},
    "afm7": {"hidden_dim": 64, "num_layers": 3, "num_kv_reuse_layers": 1},
    "exaone_moe": {"layer_types": SW, "is_moe_layer": [0, 1]},
    "gear": {"layer_types": ["full_attention", "full_attention"]},
    "gemma4_text": {"sliding_window_pattern": 2, "layer_types": SW, "num_kv_shared_layers": 0},
    "gemma4": {
        "text_config": {
            "sliding_window_pattern": 2,
            "layer_types": SW,
            "model_type": "gemma4_text",
            "num_kv_shared_layers": 0,
        }
    },
    "glm_moe_dsa": {
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "index_head_dim": 16,
        "index_n_heads": 2,
        "index_topk": 4,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
    },
    "kimi_linear": {
        "linear_attn_config": {
            "kda_layers": [1],
            "full_attn_layers": [2],
            "num_heads": 4,
            "head_dim": 16,
            "short_conv_kernel_size": 4,
        }
    },
    "kimi_k3": {
        "text_config": {
            "model_type": "kimi_k3",
            "linear_attn_config": {
                "kda_layers": [1],
                "full_attn_layers": [2],
                "num_heads": 4,
                "head_dim": 16,
                "short_conv_kernel_size": 4,
            },
        },
        "linear_attn_config": {
            "kda_layers": [1],
            "full_attn_layers": [2],
            "num_heads": 4,
            "head_dim": 16,
            "short_conv_kernel_size": 4,
        },
    },
    "longcat_flash": {
        "mla_scale_q_lora": True,
        "mla_scale_kv_lora": True,
        "zero_expert_type": "identity",
        "expert_ffn_hidden_size": 32,
    },
    "longcat_flash_ngram": {
        "mla_scale_q_lora": True,
        "mla_scale_kv_lora": True,
        "zero_expert_type": "identity",
        "expert_ffn_hidden_size": 32,
    },
    "mamba2": {"time_step_limit": [0.001, 100.0]},
    "mimo_v2_flash": {
        "moe_layer_freq": [0, 1],
        "hybrid_layer_pattern": [0, 1],
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "sliding_window_size": 16,
        "swa_num_attention_heads": 4,
        "swa_num_key_value_heads": 2,
        "swa_head_dim": 16,
        "swa_v_head_dim": 16,
        "swa_rope_theta": 10000.0,
    },
    "llama4": {
        "text_config": {
            "attention_bias": False,
            "attention_chunk_size": 64,
            "interleave_moe_layer_step": 1,
            "intermediate_size_mlp": 128,
            "rope_scaling": None,
            "use_qk_norm": True,
            "no_rope_layers": [1, 1, 1, 0],
            "model_type": "llama4_text",
            "num_experts_per_tok": 1,
            "num_hidden_layers": 4,
        }
    },
    "muse_spark": {
        "text_config": {
            "model_type": "muse_spark",
            "post_norm_eps": 1e-5,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "layer_rope_theta": [10000.0, 0],
            "layer_types": SW,
            "sliding_window": 16,
            "final_logit_softcapping": 30.0,
            "output_multiplier": 1.0,
            "moe_hidden_size": 32,
            "num_shared_experts": 0,
        }
    },
    "prism_hadamard_qwen35": {
        "schema_version": 1,
        "tensor_namespace": "mlx-lm-text",
        "quantization": {"bits": 2, "group_size": 128, "mode": "affine"},
    },
    "ministral3": {"rope_parameters": {**YARN, "llama_4_scaling_beta": 0.1, "rope_theta": 10000.0}},
    "mistral4": {"rope_parameters": {**YARN, "llama_4_scaling_beta": 0.1, "rope_theta": 10000.0}},
    "plamo": {"n_shared_head": 2},
    "qwen3_vl_moe": {
        "text_config": {
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": True,
            "model_type": "qwen3_vl_moe",
        }
    },
    "recurrent_gemma": {
        "block_types": ["recurrent", "attention"],
        "lru_width": 64,
        "conv1d_width": 4,
        "attention_window_size": 16,
        "logits_soft_cap": 30.0,
    },
    "nemotron-nas": {
        "block_configs": [
            {
                "attention": {"n_heads_in_group": 2, "no_op": False, "replace_with_linear": False},
                "ffn": {"ffn_mult": 2.0, "no_op": False, "replace_with_linear": False},
            }
        ]
        * 2
    },
    "gemma3n": {
        "text_config": {
            "model_type": "gemma3n_text",
            "num_kv_shared_layers": 0,
            "vocab_size_per_layer_input": 128,
            "sliding_window": 16,
            "rope_local_base_freq": 10000.0,
            "final_logit_softcapping": 30.0,
            "layer_types": SW,
            "activation_sparsity_pattern": [0.0, 0.0],
            "hidden_size_per_layer_input": 16,
            "altup_num_inputs": 2,
            "altup_coef_clip": 120.0,
            "altup_correct_scale": True,
            "altup_active_idx": 0,
            "laurel_rank": 8,
        }
    },
    "lfm2-vl": {
        "text_config": {
            "model_type": "lfm2",
            "conv_bias": False,
            "conv_L_cache": 3,
            "block_dim": 64,
            "block_multiple_of": 16,
            "block_ffn_dim_multiplier": 1.0,
            "block_auto_adjust_ff_dim": False,
            "full_attn_idxs": [1],
            "block_ff_dim": 128,
        }
    },
    "lfm2": {"full_attn_idxs": [1], "block_auto_adjust_ff_dim": False},
    "lfm2_moe": {"full_attn_idxs": [1]},
}

HELPERS = {"base", "cache", "rope_utils", "switch_layers", "activations"}


def architectures() -> list[str]:
    """Module names of mlx_lm.models that define both Model and ModelArgs (the importable ones)."""
    import mlx_lm.models as models

    names = []
    for info in sorted(pkgutil.iter_modules(models.__path__), key=lambda i: i.name):
        if info.name in HELPERS:
            continue
        try:
            module = importlib.import_module(f"mlx_lm.models.{info.name}")
        except BaseException:  # noqa: BLE001 - olmo exits at import without its package
            names.append(info.name)  # counted: the build records why it fails
            continue
        if hasattr(module, "Model") and hasattr(module, "ModelArgs"):
            names.append(info.name)
    return names


def _type_name(field) -> str:
    t = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    t = t.replace("Optional[", "").replace("typing.", "")
    for name in TYPE_DEFAULTS:
        if t.startswith(name) or t.startswith(name.capitalize()):
            return name
    return "int"


def generic_config(arch: str) -> dict:
    """Tiny sizes for every known field of the architecture's ModelArgs; required unknown fields get a
    type default. An argument of an inner text model (`text_config`) gets the whole TINY table."""
    try:
        module = importlib.import_module(f"mlx_lm.models.{arch}")
        fields = dataclasses.fields(module.ModelArgs)
    except BaseException:  # noqa: BLE001
        return {"model_type": arch, **{k: TINY[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")}}
    config: dict = {"model_type": arch}
    for f in fields:
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name == "model_type":
            continue
        if f.name == "text_config":
            config[f.name] = {"model_type": arch, **TINY, "tie_word_embeddings": False}
        elif f.name in TINY:
            config[f.name] = TINY[f.name]
        elif required:
            config[f.name] = TYPE_DEFAULTS[_type_name(f)]
    return config


def make_config(arch: str) -> dict:
    config = generic_config(arch)
    for key, value in OVERRIDES.get(arch, {}).items():
        if value is None:
            config.pop(key, None)
        elif value == KEEP_NONE:
            config[key] = None
        elif isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    config["torch_dtype"] = "float32"
    return config


def check(configs: dict, only: list[str] | None = None) -> int:
    """Build each model and run a forward pass; print one line per failure."""
    sys.path.insert(0, str(HERE.parent.parent))
    from tests.zoo import zoo  # noqa: PLC0415

    failures = 0
    for arch in only or configs:
        try:
            model, _ = zoo.build(arch, configs[arch])
            zoo.logits(model)
        except BaseException as e:  # noqa: BLE001
            failures += 1
            import traceback

            frames = [f for f in traceback.extract_tb(e.__traceback__) if "mlx_lm" in f.filename]
            where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].line}" if frames else ""
            print(f"{arch}: {type(e).__name__}: {str(e)[:200]}{where}")
    print(f"{failures} of {len(only or configs)} fail")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", nargs="*", help="build the models (all, or the named ones) instead of writing")
    args = parser.parse_args(argv)
    configs = {arch: make_config(arch) for arch in architectures()}
    if args.check is not None:
        return check(configs, args.check or None)
    CONFIGS.write_text(json.dumps(configs, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {len(configs)} configs to {CONFIGS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
