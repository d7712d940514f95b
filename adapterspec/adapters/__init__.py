"""Adapter layers (LoRA, switch-LoRA, embedding-LoRA, DoRA, switch-DoRA) keyed by adapter kind.

The names below load their module at first use, so that importing one module of the package (a fuse needs
`fusemath` alone) does not load every layer and mlx.nn with it."""

import importlib

_HOMES = {
    "DoRAEmbedding": "dora",
    "DoRALinear": "dora",
    "DoRASwitchLinear": "switch_dora",
    "LoRAEmbedding": "embedding",
    "LoRALinear": "lora",
    "LoRASwitchLinear": "switch",
    "dora_fused_weight": "fusemath",
    "fused_weight": "fusemath",
    "lora_delta": "fusemath",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
