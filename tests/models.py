"""Tiny real mlx-lm models for tests: build in memory, write in mlx-lm's layout, load back through adapterspec.model.files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_MODELS_DIR = ROOT / "examples" / "models"


def _load_builder():
    """The shared builder, examples/models/make_models.py, imported by path (examples/ is no package)."""
    name = "adapterspec_example_models"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE_MODELS_DIR / "make_models.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


builder = _load_builder()
ARCHITECTURES = tuple(builder.TINY_CONFIGS)
EXAMPLE_MODELS = tuple(builder.EXAMPLE_MODELS)
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe")
Q4 = {"group_size": 32, "bits": 4, "mode": "affine"}
tiny_config = builder.tiny_config
write_tokenizer = builder.write_tokenizer


def build(arch: str, *, quantization: dict | None = None, dtype: str = "float32", seed: int = 0, **overrides: Any):
    """(model, config): a tiny `arch` model with random weights; quantized as mlx-lm converts when asked."""
    return builder.build(arch, quantization=quantization, dtype=dtype, seed=seed, **overrides)


def write(path: str | Path, arch: str, *, with_tokenizer: bool = True, **build_args: Any) -> Path:
    """Build a tiny `arch` model and write it to `path` as an mlx-lm model directory; returns the path."""
    model, config = build(arch, **build_args)
    return builder.save_model_dir(model, config, Path(path), with_tokenizer=with_tokenizer)


def save(path: str | Path, model, config: dict, *, with_tokenizer: bool = True) -> Path:
    """Write an existing model and its config to `path` in mlx-lm's layout."""
    return builder.save_model_dir(model, config, Path(path), with_tokenizer=with_tokenizer)


def load(path: str | Path, lazy: bool = False):
    """(model, config) of a model directory, through adapterspec.model.files.load_model."""
    from adapterspec.adapters.loading import load_model

    return load_model(path, lazy=lazy)


def example_model_dir(name: str) -> Path:
    """The committed example model directory `name` (tiny-llama, tiny-moe, tiny-llama-4bit)."""
    path = EXAMPLE_MODELS_DIR / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is missing; run `python examples/models/make_models.py`")
    return path


# ── Hugging Face mixture-of-experts checkpoints (per-expert tensors, as transformers 4 saves them) ──

# Tiny configs of MoE architectures beside TINY_CONFIGS', as their config.json holds them.
HF_MOE_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3_moe": {
        **{k: builder.TINY_CONFIGS["mixtral"][k] for k in ("hidden_size", "num_attention_heads", "vocab_size")},
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 2,
        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "moe_intermediate_size": 32,
        "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 512, "norm_topk_prob": True,
        "tie_word_embeddings": False,
    },
    "olmoe": {
        **{k: builder.TINY_CONFIGS["mixtral"][k] for k in ("hidden_size", "num_attention_heads", "vocab_size")},
        "model_type": "olmoe", "architectures": ["OlmoeForCausalLM"], "num_hidden_layers": 2,
        "num_key_value_heads": 4, "intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": False,
    },
    "gemma4_text": {
        **{k: builder.TINY_CONFIGS["mixtral"][k] for k in ("hidden_size", "num_attention_heads", "vocab_size")},
        "model_type": "gemma4_text", "architectures": ["Gemma4ForCausalLM"], "num_hidden_layers": 3,
        "intermediate_size": 64, "head_dim": 16, "global_head_dim": 32, "vocab_size_per_layer_input": 320,
        "num_key_value_heads": 1, "num_kv_shared_layers": 1, "hidden_size_per_layer_input": 8, "sliding_window": 16,
        "sliding_window_pattern": 2, "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2,
        "moe_intermediate_size": 32, "max_position_embeddings": 512, "tie_word_embeddings": True,
    },
}  # fmt: skip
# architectures whose Hugging Face checkpoint stores experts fused, as transformers 5 does (gate_up_proj, down_proj)
HF_FUSED_EXPERTS = frozenset({"gemma4_text"})
# how the Hugging Face checkpoint of each architecture names an expert's projections (mlx-lm's name → HF's)
HF_EXPERT_NAMES = {"mixtral": {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}}


def build_any(arch: str, **build_args: Any):
    """(model, config) of a tiny model of TINY_CONFIGS or HF_MOE_CONFIGS."""
    if arch in HF_MOE_CONFIGS:
        overrides = {k: v for k, v in build_args.items() if k not in ("dtype", "seed")}
        config = {**HF_MOE_CONFIGS[arch], **overrides}
        return builder.build_model(config, build_args.get("dtype", "float32"), build_args.get("seed", builder.SEED))
    return build(arch, **build_args)


def hf_moe_weights(model, arch: str) -> dict:
    """The model's weights named as its Hugging Face checkpoint stores them: every stacked SwitchLinear weight
    (`mlp.switch_mlp.gate_proj.weight`, (experts, out, in)) un-stacked into per-expert Linear weights
    (`mlp.experts.3.gate_proj.weight`; Mixtral's `block_sparse_moe.experts.3.w1.weight`), quantized ones with
    their scales and biases."""
    import re

    from mlx.utils import tree_flatten

    names = HF_EXPERT_NAMES.get(arch, {})
    out = {}
    if arch in HF_FUSED_EXPERTS:
        return _fused_expert_weights(model)
    for name, value in tree_flatten(model.parameters()):
        match = re.match(r"^(.*)\.switch_mlp\.(\w+)\.(weight|scales|biases)$", name)
        if match is None:
            out[name] = value
            continue
        owner, proj, param = match.groups()
        for expert in range(value.shape[0]):
            out[f"{owner}.experts.{expert}.{names.get(proj, proj)}.{param}"] = value[expert]
    return out


def _fused_expert_weights(model) -> dict:
    """transformers 5's layout: `experts.gate_up_proj` (experts, 2·intermediate, hidden) holding each expert's gate
    rows then its up rows, `experts.down_proj` (experts, hidden, intermediate); and, as the checkpoint may hold them,
    k/v projections of the KV-shared layers that mlx-lm's gemma4_text drops."""
    import re

    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = dict(tree_flatten(model.parameters()))
    out = {}
    for name, value in weights.items():
        match = re.match(r"^(.*)\.switch_glu\.(\w+)_proj\.weight$", name)
        if match is None:
            out[name] = value
        elif match[2] == "gate":
            out[f"{match[1]}.gate_up_proj"] = mx.concatenate(
                [value, weights[f"{match[1]}.switch_glu.up_proj.weight"]], 1
            )
        elif match[2] == "down":
            out[f"{match[1]}.down_proj"] = value
    for layer in range(len(model.layers)):
        if f"model.layers.{layer}.self_attn.k_proj.weight" not in out:
            out[f"model.layers.{layer}.self_attn.k_proj.weight"] = mx.random.normal((16, model.args.hidden_size))
    return out


def write_hf_moe(path: str | Path, arch: str, *, shards: int = 2, **build_args: Any) -> Path:
    """A tiny `arch` model written as a Hugging Face MoE checkpoint: per-expert tensors over `shards` files with
    their index (format "pt"), config.json as transformers writes it (no mlx keys), tokenizer files."""
    import json

    import mlx.core as mx

    model, config = build_any(arch, **build_args)
    weights = hf_moe_weights(model, arch)
    path = Path(path)
    path.mkdir(parents=True)
    names = list(weights)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        filename = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[i * per_shard : (i + 1) * per_shard]}
        mx.save_safetensors(str(path / filename), part, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, filename))
    total = sum(v.nbytes for v in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(path, config["vocab_size"])
    return path
