"""What the safetensors headers cannot tell: mlx-lm modules whose weights look like a Linear, a SwitchLinear
or an Embedding but are something else (or are an embedding under another name). Pure Python, no mlx.

The header-based index (`index.infos_from_tensors`) knows parameter names, shapes and config.json only.
These rules use what those say — the config's keys and model type, the module's name and the shape of
its parameters — so that the directory index gives the family the live model gives for the same module:

* MLA's `MultiLinear` (`embed_q`, `unembed_out`; 3-D weight, one matrix per head) is no SwitchLinear;
  live it is no Linear either, so both sides call it a leaf (not adaptable).
* a 2-D weight with a 2-D bias (`LayerNormPerHead`), or a 2-D weight named like a norm, is no Linear.
* a few mlx-lm classes hold a bare 2-D `weight` the headers cannot tell from a Linear's; they are named
  per model type in `BARE_WEIGHT_CLASSES` (deepseek's `MoEGate`, iquestloopcoder's `LoopGateProjection`).
* the elements of a list named like an embedding list (`ngram_embeddings.embedders.0`) are embeddings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

Shape = tuple[int, ...]

# MLA's per-head projections in mlx-lm (deepseek_v3 and its kin): 3-D weights that are not experts.
MULTI_LINEAR_NAMES = frozenset({"embed_q", "unembed_out"})
# config keys that say the attention is MLA (multi-head latent attention)
MLA_CONFIG_KEYS = ("kv_lora_rank", "q_lora_rank")
# path words of routed experts: a 3-D weight under one of these is a SwitchLinear even in an MLA model
EXPERT_WORDS = re.compile(r"expert|switch|moe", re.IGNORECASE)
# SwitchLinears outside any mixture in MLA models: deepseek_v41's grouped output projection (one matrix per group)
GROUPED_SWITCH_NAMES = frozenset({"o_a_proj"})
# model type → (path pattern, class): bare 2-D weights of classes that are not nn.Linear in mlx-lm
BARE_WEIGHT_CLASSES: dict[str, tuple[tuple[re.Pattern, str], ...]] = {
    "deepseek": ((re.compile(r"(^|\.)mlp\.gate$"), "MoEGate"),),
    "deepseek_v2": ((re.compile(r"(^|\.)mlp\.gate$"), "MoEGate"),),
    "iquestloopcoder": ((re.compile(r"(^|\.)gate_projections\.\d+$"), "LoopGateProjection"),),
}
NORM_NAME = re.compile(r"norm|^ln(_|$)|_ln$|^ln_f$", re.IGNORECASE)
EMBEDDING_LIST_WORD = re.compile(r"(^|_)embed(?!_out)(?!.*proj)", re.IGNORECASE)  # not altup_unembed_projections


@dataclass(frozen=True)
class ConfigHints:
    """What config.json says that classification needs: the model types (top level and text_config) and MLA."""

    model_types: frozenset[str] = field(default_factory=frozenset)
    mla: bool = False

    @classmethod
    def from_config(cls, config: dict | None) -> "ConfigHints":
        config = config if isinstance(config, dict) else {}
        parts = [config] + [config[k] for k in ("text_config", "language_config") if isinstance(config.get(k), dict)]
        types = frozenset(p["model_type"] for p in parts if isinstance(p.get("model_type"), str))
        mla = any(isinstance(p.get(k), int) and not isinstance(p.get(k), bool) for p in parts for k in MLA_CONFIG_KEYS)
        return cls(types, mla)


def is_multi_linear(path: str, weight_ndim: int, hints: ConfigHints) -> bool:
    """A 3-D weight that is MLA's MultiLinear (one matrix per head) rather than a SwitchLinear."""
    if weight_ndim != 3:
        return False
    name = path.rsplit(".", 1)[-1]
    if name in GROUPED_SWITCH_NAMES:
        return False
    return name in MULTI_LINEAR_NAMES or (hints.mla and not EXPERT_WORDS.search(path))


def bare_weight_class(path: str, weight: Shape, bias: Shape | None, hints: ConfigHints) -> str | None:
    """The class of a module with a 2-D weight that is not an nn.Linear (None when it may be one)."""
    if len(weight) != 2:
        return None
    name = path.rsplit(".", 1)[-1]
    if bias is not None and tuple(bias) != (weight[0],):
        return "Norm" if NORM_NAME.search(name) else "Leaf"
    if NORM_NAME.search(name):
        return "Norm"
    for model_type in hints.model_types:
        for pattern, cls in BARE_WEIGHT_CLASSES.get(model_type, ()):
            if pattern.search(path):
                return cls
    return None


def linear_subclass(path: str, quantized: bool, hints: ConfigHints) -> str | None:
    """The class of a Linear-looking module that is an mlx-lm subclass of nn.Linear (None for a plain one)."""
    for model_type in hints.model_types:
        for pattern, cls, quantized_cls in LINEAR_SUBCLASSES.get(model_type, ()):
            if pattern.search(path):
                return quantized_cls if quantized else cls
    return None


# path words of a mixture's shared experts, and of attention (whose SwitchLinears group heads, routing nothing)
SHARED_WORD = re.compile(r"shared", re.IGNORECASE)
ATTENTION_WORD = re.compile(r"attn|attention|mixer|temporal_block|linear_attn", re.IGNORECASE)
# attention proper (a `mixer` may hold a mixture of experts: nemotron_h)
SELF_ATTENTION_WORD = re.compile(r"attn|attention", re.IGNORECASE)


def is_routed_expert(info) -> bool:
    """A routed expert layer: a SwitchLinear of a mixture, or a linear of a per-expert list (`experts.3.w1`)."""
    if not info.adaptable or SHARED_WORD.search(info.path):
        return False
    if info.family == "switch":  # a SwitchLinear in the attention groups heads, it routes nothing
        return not any(SELF_ATTENTION_WORD.search(s) for s in info.path.split(".")[:-1])
    parts = info.path.split(".")
    # per-expert linears: ...experts.3.w1 (a list of experts, each a module of linears)
    return info.family == "linear" and any(p == "experts" and q.isdigit() for p, q in zip(parts, parts[1:]))


def is_embedding_path(path: str, embedding_names: frozenset[str]) -> bool:
    """Named like an embedding, or an element of a list named like one (`ngram_embeddings.embedders.0`)."""
    parts = path.split(".")
    if parts[-1] in embedding_names:
        return True
    return len(parts) >= 2 and parts[-1].isdigit() and bool(EMBEDDING_LIST_WORD.search(parts[-2]))


# model type → lists whose blocks mlx-lm's `model.layers` property appends to the block list (what its
# `num_layers` counts from the end); `layers` in a spec means the block list alone
APPENDED_BLOCK_LISTS = {"afm7": ("model.kv_reuse_layers",)}


def appended_block_lists(model_type: str | None) -> tuple[str, ...]:
    return APPENDED_BLOCK_LISTS.get(model_type or "", ())


# ── architectures that cannot take some adapters (docs/architecture.md, "Architectures with limits") ──

# mlx-lm classes whose instances look adaptable (an nn.Linear subclass) but that no adapter layer can wrap
FUSED_LINEAR_REASON = (
    "afm7's FusedLinear returns a list of outputs (q, k, v split), which a LoRA layer cannot add to; "
    "mlx-lm wraps it with its own FusedLoRALinear"
)
UNADAPTABLE_CLASSES = {"FusedLinear": FUSED_LINEAR_REASON, "FusedQuantizedLinear": FUSED_LINEAR_REASON}
# model type → (path pattern, class, quantized class): nn.Linear subclasses the headers cannot tell from a Linear
LINEAR_SUBCLASSES: dict[str, tuple[tuple[re.Pattern, str, str], ...]] = {
    "afm7": ((re.compile(r"(^|\.)qkv_proj$"), "FusedLinear", "FusedQuantizedLinear"),),
}
# (model type, module path) → why `fuse` refuses an adapter on that module: merging into the stored
# weight would not give the adapted model's function
UNFUSABLE_MODULES = {
    ("baichuan_m1", "lm_head"): (
        "baichuan_m1's lm_head is a NormHead, which normalises its weight at every call: a LoRA merged "
        "into the stored weight would be normalised too, a different function from the adapted model's; "
        "keep the adapter unfused (apply --adapters), or leave lm_head out of the spec"
    ),
}


def unadaptable_reason(class_name: str) -> str | None:
    """Why a module of this class cannot take an adapter (None when it can)."""
    return UNADAPTABLE_CLASSES.get(class_name)


def unfusable_reason(model_types: frozenset[str] | set[str], path: str) -> str | None:
    """Why the fuse cannot merge an adapter on `path` of a model of these types (None when it can)."""
    for model_type in model_types:
        reason = UNFUSABLE_MODULES.get((model_type, path))
        if reason:
            return reason
    return None


# (model types, path pattern) → modules whose `.weight` the model code reads or writes itself. adapterspec's
# layers forward `.weight` to the base; mlx-lm's own LoRALinear / LoRAEmbedding do not, so an adapter
# directory that adapts one of these is not marked loadable by mlx-lm's `load_adapters`.
WEIGHT_READ_BY_MODEL = (
    (frozenset({"gemma3n", "gemma3n_text"}), re.compile(r"(^|\.)altup\.(prediction|correction)_coefs$"),
     "gemma3n reads and writes the altup coefficients' .weight itself"),
    (frozenset({"seed_oss"}), re.compile(r"(^|\.)embed_tokens$"),
     "seed_oss computes its tied head from embed_tokens.weight"),
)  # fmt: skip


def weight_read_by_model(model_types, path: str) -> str | None:
    """Why model code reads this module's `.weight` itself (None when it does not, as far as is known)."""
    for types, pattern, reason in WEIGHT_READ_BY_MODEL:
        if types & set(model_types) and pattern.search(path):
            return reason
    return None
