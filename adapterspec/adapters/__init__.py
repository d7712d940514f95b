"""Adapter layers (LoRA, switch-LoRA, embedding-LoRA, DoRA) keyed by adapter kind."""

import mlx.nn as nn

from .dora import DoRAEmbedding, DoRALinear
from .embedding import LoRAEmbedding
from .fusemath import dora_fused_weight, fused_weight, lora_delta
from .lora import LoRALinear
from .switch import LoRASwitchLinear

ADAPTER_CLASSES: dict[str, type[nn.Module]] = {
    cls.kind: cls for cls in (LoRALinear, LoRASwitchLinear, LoRAEmbedding, DoRALinear, DoRAEmbedding)
}


def from_base(
    kind: str, base: nn.Module, r: int = 8, scale: float = 20.0, dropout: float = 0.0, freeze_base: bool = True
) -> nn.Module:
    """Wrap `base` in the adapter of `kind` (a key of ADAPTER_CLASSES); the base is frozen unless told not to."""
    try:
        cls = ADAPTER_CLASSES[kind]
    except KeyError:
        raise ValueError(f"unknown adapter kind {kind!r}; expected one of {sorted(ADAPTER_CLASSES)}") from None
    return cls.from_base(base, r=r, scale=scale, dropout=dropout, freeze_base=freeze_base)


__all__ = [
    "ADAPTER_CLASSES",
    "DoRAEmbedding",
    "DoRALinear",
    "LoRAEmbedding",
    "LoRALinear",
    "LoRASwitchLinear",
    "dora_fused_weight",
    "from_base",
    "fused_weight",
    "lora_delta",
]
