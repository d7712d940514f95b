"""LoRA on a SwitchLinear / QuantizedSwitchLinear: a separate A and B for every expert."""

import mlx.core as mx
import mlx.nn as nn

from . import fusemath
from .basemodules import dense_weight, low_rank_init, quantization


def gather_mm_dtype(dtype: mx.Dtype) -> mx.Dtype:
    """`dtype`, except on the CPU, whose gather_mm computes in float32 only."""
    if mx.default_device().type == mx.DeviceType.cpu:
        return mx.float32
    return dtype


class LoRASwitchLinear(nn.Module):
    """A frozen switch base at `.linear` plus float32 `lora_a` (E, r, in) and `lora_b` (E, out, r)."""

    kind = "switch-lora"

    @classmethod
    def from_base(cls, base: nn.Module, r: int = 8, scale: float = 20.0, dropout: float = 0.0):
        return cls(base, r=r, scale=scale, dropout=dropout)

    def __init__(self, base: nn.Module, r: int = 8, scale: float = 20.0, dropout: float = 0.0):
        super().__init__()
        base.freeze()
        num_experts, input_dims, output_dims = base.num_experts, base.input_dims, base.output_dims
        self.linear = base
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        self.num_experts = num_experts
        self.lora_a = low_rank_init((num_experts, r, input_dims), fan_in=input_dims)
        self.lora_b = mx.zeros((num_experts, output_dims, r))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = self.linear(x, indices, sorted_indices=sorted_indices)
        dtype = gather_mm_dtype(y.dtype)
        a_t = self.lora_a.astype(dtype).swapaxes(-1, -2)
        b_t = (self.scale * self.lora_b).astype(dtype).swapaxes(-1, -2)
        z = mx.gather_mm(self.dropout(x).astype(dtype), a_t, rhs_indices=indices, sorted_indices=sorted_indices)
        return y + mx.gather_mm(z, b_t, rhs_indices=indices, sorted_indices=sorted_indices).astype(y.dtype)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        from mlx_lm.models.switch_layers import SwitchLinear

        base = self.linear
        weight = fusemath.fused_weight(self.kind, dense_weight(base), self.lora_a, self.lora_b, self.scale)
        num_experts, output_dims, input_dims = weight.shape
        has_bias = "bias" in base
        fused = SwitchLinear(input_dims, output_dims, num_experts, bias=has_bias)
        fused.weight = weight
        if has_bias:
            fused.bias = base.bias
        q = quantization(base)
        if q is not None and not dequantize:
            fused = fused.to_quantized(**q)
        return fused
