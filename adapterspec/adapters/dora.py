"""DoRA on a Linear / QuantizedLinear and on an Embedding / QuantizedEmbedding (no switch variant).

The adapted weight's rows are renormalised to a learned magnitude `m`:
W' = m · (W + scale·ΔW) / ‖W + scale·ΔW‖, with the norm treated as a constant in the backward pass.
"""

import mlx.core as mx
import mlx.nn as nn

from . import fusemath
from .basemodules import dense_weight, matmul_without_bias
from .embedding import LoRAEmbedding, dense_or_requantized_embedding
from .lora import LoRALinear, dense_or_requantized_linear


def _adapted_row_norms(kind: str, module: nn.Module, base: nn.Module) -> mx.array:
    delta = fusemath.lora_delta(kind, module.lora_a, module.lora_b, module.scale)
    return mx.stop_gradient(fusemath.row_norms(dense_weight(base).astype(mx.float32) + delta))


class DoRALinear(LoRALinear):
    """LoRALinear's base and factors plus a float32 magnitude `m` (out,)."""

    kind = "dora"

    def __init__(
        self, base: nn.Module, r: int = 8, scale: float = 20.0, dropout: float = 0.0, freeze_base: bool = True
    ):
        super().__init__(base, r=r, scale=scale, dropout=dropout, freeze_base=freeze_base)
        self.m = fusemath.row_norms(dense_weight(base))

    def __call__(self, x: mx.array) -> mx.array:
        y = matmul_without_bias(self.linear, x)
        dtype = y.dtype
        z = self.dropout(x).astype(dtype) @ self.lora_a.astype(dtype)
        out = mx.addmm(y, z, (self.scale * self.lora_b).astype(dtype))
        magnitude = self.m / _adapted_row_norms(self.kind, self, self.linear)
        out = magnitude.astype(dtype) * out
        if "bias" in self.linear:
            out = out + self.linear.bias
        return out

    def fuse(self, dequantize: bool = False) -> nn.Module:
        weight = fusemath.dora_fused_weight(
            self.kind, dense_weight(self.linear), self.lora_a, self.lora_b, self.m, self.scale
        )
        return dense_or_requantized_linear(self.linear, weight, dequantize)


class DoRAEmbedding(LoRAEmbedding):
    """LoRAEmbedding's base and factors plus a float32 magnitude `m` (num,)."""

    kind = "dora-embedding"

    def __init__(
        self, base: nn.Module, r: int = 8, scale: float = 20.0, dropout: float = 0.0, freeze_base: bool = True
    ):
        super().__init__(base, r=r, scale=scale, dropout=dropout, freeze_base=freeze_base)
        self.m = fusemath.row_norms(dense_weight(base))

    def __call__(self, ids: mx.array) -> mx.array:
        y = self.embedding(ids)
        dtype = y.dtype
        z = self.scale * (self.lora_a[ids] @ self.lora_b)
        out = y + self.dropout(z).astype(dtype)
        denom = mx.stop_gradient(mx.linalg.norm(y.astype(mx.float32) + z, axis=-1))
        return (self.m[ids] / denom).astype(dtype)[..., None] * out

    def as_linear(self, x: mx.array) -> mx.array:
        y = self.embedding.as_linear(x)
        dtype = y.dtype
        z = self.dropout(x).astype(dtype) @ (self.scale * self.lora_b).T.astype(dtype)
        out = mx.addmm(y, z, self.lora_a.T.astype(dtype))
        magnitude = self.m / _adapted_row_norms(self.kind, self, self.embedding)
        return magnitude.astype(dtype) * out

    def fuse(self, dequantize: bool = False) -> nn.Module:
        weight = fusemath.dora_fused_weight(
            self.kind, dense_weight(self.embedding), self.lora_a, self.lora_b, self.m, self.scale
        )
        return dense_or_requantized_embedding(self.embedding, weight, dequantize)
