"""Adapter layers (LoRA, switch-LoRA, embedding-LoRA, DoRA, switch-DoRA) keyed by adapter kind."""

from .dora import DoRAEmbedding, DoRALinear
from .embedding import LoRAEmbedding
from .fusemath import dora_fused_weight, fused_weight, lora_delta
from .lora import LoRALinear
from .switch import LoRASwitchLinear
from .switch_dora import DoRASwitchLinear

__all__ = [
    "DoRAEmbedding",
    "DoRALinear",
    "DoRASwitchLinear",
    "LoRAEmbedding",
    "LoRALinear",
    "LoRASwitchLinear",
    "dora_fused_weight",
    "fused_weight",
    "lora_delta",
]
