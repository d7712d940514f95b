"""Adapter layers (LoRA, switch-LoRA, embedding-LoRA, DoRA) keyed by adapter kind."""

from .dora import DoRAEmbedding, DoRALinear
from .embedding import LoRAEmbedding
from .fusemath import dora_fused_weight, fused_weight, lora_delta
from .lora import LoRALinear
from .switch import LoRASwitchLinear

__all__ = [
    "DoRAEmbedding",
    "DoRALinear",
    "LoRAEmbedding",
    "LoRALinear",
    "LoRASwitchLinear",
    "dora_fused_weight",
    "fused_weight",
    "lora_delta",
]
