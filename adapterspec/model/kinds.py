"""The adapter kinds, in one place: the transform each comes from, the module family it adapts, its parameters and their shapes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

LOW_RANK_TRANSFORMS = ("lora", "dora")


@dataclass(frozen=True)
class AdapterKind:
    """One kind of adapter: `transform` (as written in a spec) on a module of `family`."""

    name: str
    transform: str
    family: str

    @property
    def dora(self) -> bool:
        return self.transform == "dora"

    @property
    def params(self) -> tuple[str, ...]:
        """The adapter's own parameters, by the names mlx-lm gives them."""
        if self.transform == "tokens":
            return ("token_rows",)
        return ("lora_a", "lora_b", "m") if self.dora else ("lora_a", "lora_b")

    def shapes(
        self, input_dims: int, output_dims: int, r: int, num_experts: Optional[int] = None
    ) -> dict[str, tuple[int, ...]]:
        """The shape of each parameter on a base of these logical dims (an embedding: number of rows, dimension);
        for `tokens`, `r` is the number of rows it trains."""
        if self.transform == "tokens":
            return {"token_rows": (r, output_dims)}
        if self.family == "switch":
            experts = num_experts or 1
            shapes = {
                "lora_a": (experts, r, input_dims),
                "lora_b": (experts, output_dims, r),
                "m": (experts, output_dims),
            }
        else:
            magnitude = input_dims if self.family == "embedding" else output_dims
            shapes = {"lora_a": (input_dims, r), "lora_b": (r, output_dims), "m": (magnitude,)}
        return {param: shapes[param] for param in self.params}

    def parameters(self, input_dims: int, output_dims: int, r: int, num_experts: Optional[int] = None) -> int:
        return sum(math.prod(shape) for shape in self.shapes(input_dims, output_dims, r, num_experts).values())


KINDS: dict[str, AdapterKind] = {
    kind.name: kind
    for kind in (
        AdapterKind("lora", "lora", "linear"),
        AdapterKind("switch-lora", "lora", "switch"),
        AdapterKind("embedding-lora", "lora", "embedding"),
        AdapterKind("dora", "dora", "linear"),
        AdapterKind("dora-embedding", "dora", "embedding"),
        AdapterKind("embedding-tokens", "tokens", "embedding"),
        AdapterKind("switch-dora", "dora", "switch"),
    )
}
DORA_KINDS = tuple(name for name, kind in KINDS.items() if kind.dora)
TOKEN_KINDS = tuple(name for name, kind in KINDS.items() if kind.transform == "tokens")
EMBEDDING_KINDS = tuple(name for name, kind in KINDS.items() if kind.family == "embedding" and name not in TOKEN_KINDS)
SWITCH_KINDS = tuple(name for name, kind in KINDS.items() if kind.family == "switch")
LINEAR_KINDS = tuple(name for name, kind in KINDS.items() if kind.family == "linear")


def kind_for(transform: str, family: str) -> Optional[AdapterKind]:
    """The adapter a low-rank transform becomes on a module of `family`; None where there is none."""
    for kind in KINDS.values():
        if kind.transform == transform and kind.family == family:
            return kind
    return None
