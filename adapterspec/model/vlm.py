"""Vision-language models in mlx-vlm's layout: how a model directory or module tree is told apart from a text
model, and the plans mlx-vlm's `adapter_config.json` can say (which architectures the installed mlx-vlm builds
is `config.mlx_vlm_model_problem`). Pure Python, no mlx."""

from __future__ import annotations

from .config import is_vlm_config
from .config_fit import ConfigFit, one_setting_reasons
from .kinds import KINDS

# the root of the language model in every mlx-vlm architecture
LANGUAGE_ROOT = "language_model"
# top-level modules of a text model (mlx-lm's own layout, or a VL wrapper loaded as text only)
TEXT_ROOTS = frozenset({LANGUAGE_ROOT, "model", "lm_head"})
VLM_EXTRA = "vlm"
VLM_EXTRA_HELP = f"install the VLM extra: pip install 'adapterspec[{VLM_EXTRA}]' (it brings mlx-vlm)"
# mlx-vlm's LoRALinear and DoRALinear wrap nn.Linear and nn.QuantizedLinear only
MLX_VLM_FAMILIES = frozenset({"linear"})


def is_vlm_index(index) -> bool:
    """A module tree (live or from a directory) in mlx-vlm's layout: a language_model beside other towers."""
    roots = {info.name for info in index.children("")}
    return LANGUAGE_ROOT in roots and bool(roots - TEXT_ROOTS)


def is_vlm_dir(config: dict, index) -> bool:
    """A model directory that mlx-vlm builds: a VLM config whose weights hold more than the language model (a
    text-only conversion of a VLM keeps vision_config but not the tower, and mlx-lm builds it)."""
    return is_vlm_config(config) and is_vlm_index(index)


# ── mlx-vlm's adapter_config.json ───────────────────────────────────────────


def mlx_vlm_config(plan) -> ConfigFit:
    """The keys of `adapter_config.json` that make mlx-vlm's loader (`apply_lora_layers`, behind
    `mlx_vlm.load(..., adapter_path=...)` and `mlx_vlm.generate --adapter-path`) build exactly this plan's
    adapters: one rank, scale and dropout, lora or dora, on linear layers named by their full paths."""
    entries = plan.entries
    reasons = []
    if not entries:
        reasons.append("the plan adapts no module")
    kinds = {e.adapter for e in entries}
    if "full" in kinds:
        reasons.append("it trains some modules fully ('full'), which mlx-vlm's lora/dora configs cannot say")
    transforms = {KINDS[k].transform for k in kinds - {"full"}}
    if transforms == {"lora", "dora"}:
        reasons.append("it mixes lora and dora")
    other = next((e for e in entries if e.adapter != "full" and KINDS[e.adapter].family not in MLX_VLM_FAMILIES), None)
    if other is not None:
        reasons.append(f"it puts {other.adapter} on '{other.path}'; mlx-vlm's adapters wrap linear layers only")
    reasons += one_setting_reasons(entries, "mlx-vlm")
    if reasons:
        return ConfigFit(None, reasons)
    first = entries[0]
    config = {
        "fine_tune_type": "dora" if transforms == {"dora"} else "lora",
        "num_layers": -1,
        "lora_parameters": {
            "rank": first.r,
            "scale": first.scale,
            "dropout": first.dropout or 0.0,
            "keys": [e.path for e in entries],
        },
    }
    return ConfigFit(config, [])
