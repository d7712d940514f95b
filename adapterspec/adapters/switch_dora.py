"""DoRA on a SwitchLinear / QuantizedSwitchLinear: per-expert A and B, and a magnitude per expert and output row.

For expert e, W_e' = W_e + scale·B_e·A_e and y = (m_e / ‖W_e'‖) ⊙ (x·W_e'ᵀ), the norm taken over each output
row and treated as a constant in the backward pass, as mlx-lm's DoRALinear does for one linear.
"""

import mlx.core as mx
import mlx.nn as nn

from . import fusemath
from .basemodules import dense_weight, quantization
from .switch import LoRASwitchLinear, gather_mm_dtype, switch_linear


def switch_matmul_without_bias(base: nn.Module, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
    """x·W_eᵀ for the expert each row of `indices` names, leaving out the base's bias."""
    q = quantization(base)
    if q is None:
        return mx.gather_mm(x, base.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)
    return mx.gather_qmm(
        x,
        base.weight,
        base.scales,
        base.get("biases"),
        rhs_indices=indices,
        transpose=True,
        global_scale=getattr(base, "global_scale", None),
        sorted_indices=sorted_indices,
        **q,
    )


def adapted_row_norms(weight: mx.array, lora_a: mx.array, lora_b: mx.array, scale: float) -> mx.array:
    """‖W_e + scale·B_e·A_e‖ of every output row (E, out), in float32, without forming the (E, out, in) sum.

    ‖w + s·b·A‖² = ‖w‖² + 2s·b·(A·w) + s²·b·(A·Aᵀ)·bᵀ for a row w of W_e and its row b of B_e.
    """
    w = weight.astype(mx.float32)
    a = lora_a.astype(mx.float32)
    b = scale * lora_b.astype(mx.float32)
    wa = w @ a.swapaxes(-1, -2)  # (E, out, r)
    gram = a @ a.swapaxes(-1, -2)  # (E, r, r)
    squared = mx.sum(w * w, axis=-1) + 2 * mx.sum(b * wa, axis=-1) + mx.sum(b * (b @ gram), axis=-1)
    return mx.sqrt(mx.maximum(squared, 0.0))


class DoRASwitchLinear(LoRASwitchLinear):
    """LoRASwitchLinear's base and factors plus a float32 magnitude `m` (E, out), initialised to the base's row norms."""

    kind = "switch-dora"

    def __init__(
        self, base: nn.Module, r: int = 8, scale: float = 20.0, dropout: float = 0.0, freeze_base: bool = True
    ):
        super().__init__(base, r=r, scale=scale, dropout=dropout, freeze_base=freeze_base)
        self.m = fusemath.row_norms(dense_weight(base))

    def row_norms(self) -> mx.array:
        """‖W_e'‖ per expert and output row (E, out), a constant to the gradient."""
        return mx.stop_gradient(adapted_row_norms(dense_weight(self.linear), self.lora_a, self.lora_b, self.scale))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = switch_matmul_without_bias(self.linear, x, indices, sorted_indices)
        dtype = gather_mm_dtype(y.dtype)
        gather = dict(rhs_indices=indices, sorted_indices=sorted_indices)
        z = mx.gather_mm(self.dropout(x).astype(dtype), self.lora_a.astype(dtype).swapaxes(-1, -2), **gather)
        delta = mx.gather_mm(z, (self.scale * self.lora_b).astype(dtype).swapaxes(-1, -2), **gather)
        out = y + delta.astype(y.dtype)
        magnitude = (self.m / self.row_norms())[indices]  # indices.shape + (out,)
        out = mx.expand_dims(magnitude, -2).astype(out.dtype) * out
        if "bias" in self.linear:
            out = out + mx.expand_dims(self.linear.bias[indices], -2)
        return out

    def fuse(self, dequantize: bool = False) -> nn.Module:
        weight = fusemath.dora_fused_weight(
            self.kind, dense_weight(self.linear), self.lora_a, self.lora_b, self.m, self.scale
        )
        return switch_linear(self.linear, weight, dequantize)
