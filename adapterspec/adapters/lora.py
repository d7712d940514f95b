"""LoRA on a Linear or QuantizedLinear: y = base(x) + scale · (dropout(x) · A) · B."""

import mlx.core as mx
import mlx.nn as nn

from . import fusemath
from .basemodules import dense_weight, last_dim, low_rank_init, quantization


class LoRALinear(nn.Module):
    """A frozen linear base at `.linear` plus float32 `lora_a` (in, r) and `lora_b` (r, out)."""

    kind = "lora"

    @classmethod
    def from_base(cls, base: nn.Module, r: int = 8, scale: float = 20.0, dropout: float = 0.0):
        return cls(base, r=r, scale=scale, dropout=dropout)

    def __init__(self, base: nn.Module, r: int = 8, scale: float = 20.0, dropout: float = 0.0):
        super().__init__()
        base.freeze()
        input_dims, output_dims = last_dim(base), base.weight.shape[0]
        self.linear = base
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        self.lora_a = low_rank_init((input_dims, r), fan_in=input_dims)
        self.lora_b = mx.zeros((r, output_dims))

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        dtype = y.dtype
        z = self.dropout(x).astype(dtype) @ self.lora_a.astype(dtype)
        return mx.addmm(y, z, self.lora_b.astype(dtype), alpha=self.scale)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        base = self.linear
        weight = fusemath.fused_weight(self.kind, dense_weight(base), self.lora_a, self.lora_b, self.scale)
        return dense_or_requantized_linear(base, weight, dequantize)


def dense_or_requantized_linear(base: nn.Module, weight: mx.array, dequantize: bool) -> nn.Module:
    """A plain Linear holding `weight` and the base's bias, requantized like the base unless told not to."""
    output_dims, input_dims = weight.shape
    has_bias = "bias" in base
    fused = nn.Linear(input_dims, output_dims, bias=has_bias)
    fused.weight = weight
    if has_bias:
        fused.bias = base.bias
    q = quantization(base)
    if q is not None and not dequantize:
        fused = nn.QuantizedLinear.from_linear(fused, **q)
    return fused
