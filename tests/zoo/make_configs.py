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
    "hidden_size": 64, "dim": 64, "d_model": 64, "n_embd": 64, "model_dim": 64, "embed_dim": 64,
    "intermediate_size": 128, "ffn_dim": 128, "ffn_hidden_size": 128, "n_inner": 128, "dim_ff": 128,
    "hidden_dim": 128, "block_ff_dim": 128,
    "moe_intermediate_size": 32, "expert_intermediate_size": 32, "moe_ffn_hidden_size": 32,
    "shared_expert_intermediate_size": 64, "moe_shared_expert_intermediate_size": 64,
    "head_dim": 16, "kv_channels": 16, "attention_head_dim": 16,
    # depth
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "num_transformer_layers": 2,
    # heads
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4,
    "num_key_value_heads": 2, "n_kv_heads": 2, "num_kv_heads": 2, "multi_query_group_num": 2,
    # vocabulary and positions
    "vocab_size": 128, "n_positions": 512, "max_position_embeddings": 512, "n_ctx": 512,
    "max_seq_len": 512, "seq_length": 512,
    # experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_k": 2, "moe_topk": 2, "top_k": 2, "moe_top_k": 2, "num_experts_per_token": 2,
    "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1,
    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    # multi-head latent attention
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    # norms and rope
    "rms_norm_eps": 1e-5, "layer_norm_epsilon": 1e-5, "layer_norm_eps": 1e-5, "norm_eps": 1e-5,
    "rope_theta": 10000.0,
}
TYPE_DEFAULTS = {"int": 2, "float": 1e-5, "bool": False, "str": "", "dict": {}, "list": []}

# Hand fixes: merged last (None deletes a key).
OVERRIDES: dict[str, dict] = {
    "gemma": {"tie_word_embeddings": True},
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
            print(f"{arch}: {type(e).__name__}: {str(e)[:300]}")
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
