"""Vision-language models in mlx-vlm's layout: how a model directory or module tree is told apart from a text
model, and the plans mlx-vlm's `adapter_config.json` can say (which architectures the installed mlx-vlm builds
is `config.mlx_vlm_model_problem`). Pure Python, no mlx."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .config import is_vlm_config
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


@dataclass
class MlxVlmFit:
    """Whether a plan is expressible as an mlx-vlm adapter config, and the config or the reasons why not."""

    config: Optional[dict] = None
    reasons: list[str] = field(default_factory=list)

    @property
    def compatible(self) -> bool:
        return self.config is not None


def mlx_vlm_config(plan) -> MlxVlmFit:
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
    for name, values in (
        ("rank", {e.r for e in entries}),
        ("scale", {e.scale for e in entries}),
        ("dropout", {e.dropout for e in entries}),
    ):
        values.discard(None)
        if len(values) > 1:
            shown = ", ".join(f"{v:g}" for v in sorted(values))
            reasons.append(f"it uses {len(values)} different {name} values ({shown}); mlx-vlm has one")
    if reasons:
        return MlxVlmFit(None, reasons)
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
    return MlxVlmFit(config, [])
