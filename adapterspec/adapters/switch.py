"""LoRA on a SwitchLinear / QuantizedSwitchLinear: a separate A and B for every expert."""

import mlx.core as mx
import mlx.nn as nn

from . import fusemath, lowrank, pathchoice
from .basemodules import AdapterModule, dense_weight, low_rank_init, quantization


def gather_mm_dtype(dtype: mx.Dtype) -> mx.Dtype:
    """`dtype`, except on the CPU, whose gather_mm computes in float32 only."""
    if mx.default_device().type == mx.DeviceType.cpu:
        return mx.float32
    return dtype


def switch_backward(x, a, b, dy, weight, indices, sorted_indices, low_rank_dx: bool):
    """Gradients of gather_mm(x, (W + b·a)ᵀ), a and b per expert; x through `weight`: the merged experts, or with
    `low_rank_dx` the base experts W, the low-rank term gather_mm(dy·b, a) added.

    Rows of x (..., M, in) are broadcast against `indices`; dy is (..., M, out) over the broadcast
    batch. Each expert's a and b gradients sum outer products over the rows routed to it; placing
    every row's low-rank vector in its expert's slot of an (E·r)-wide row turns all E sums into one
    matmul.
    """
    num_experts, r, _ = a.shape
    gather = dict(rhs_indices=indices, sorted_indices=sorted_indices)
    z = mx.gather_mm(x, a.swapaxes(-1, -2), **gather)
    g = mx.gather_mm(dy, b, **gather)
    dx = mx.gather_mm(dy, weight, **gather)
    if low_rank_dx:
        dx = dx + mx.gather_mm(g, a, **gather)
    dx = lowrank.sum_to_shape(dx, x.shape)
    one_hot = (indices[..., None] == mx.arange(num_experts)).astype(dy.dtype)[..., None, None]

    def by_expert(v, batch_shape):
        """(batch..., M, r) -> (rows·M, E·r), each row's r values in its expert's slot."""
        spread = lowrank.sum_to_shape(one_hot * mx.expand_dims(v, -3), batch_shape + (num_experts,) + v.shape[-2:])
        spread = spread.reshape(-1, num_experts, *v.shape[-2:]).swapaxes(1, 2)
        return spread.reshape(-1, num_experts * r)

    da = (by_expert(g, x.shape[:-2]).T @ lowrank.rows(x)).reshape(num_experts, r, -1)
    db = (lowrank.rows(dy).T @ by_expert(z, dy.shape[:-2])).reshape(-1, num_experts, r).swapaxes(0, 1)
    return dx, da, db


def switch_linear(base: nn.Module, weight: mx.array, dequantize: bool) -> nn.Module:
    """A SwitchLinear holding `weight` and the base's bias, quantized as the base was unless `dequantize`."""
    from mlx_lm.models.switch_layers import SwitchLinear

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


class LoRASwitchLinear(AdapterModule):
    """A frozen switch base at `.linear` plus float32 `lora_a` (E, r, in) and `lora_b` (E, out, r)."""

    kind = "switch-lora"

    def __init__(
        self, base: nn.Module, r: int = 8, scale: float = 20.0, dropout: float = 0.0, freeze_base: bool = True
    ):
        super().__init__(base, scale, dropout, freeze_base)
        num_experts, input_dims, output_dims = base.num_experts, base.input_dims, base.output_dims
        self.num_experts = num_experts
        self.lora_a = low_rank_init((num_experts, r, input_dims), fan_in=input_dims)
        self.lora_b = mx.zeros((num_experts, output_dims, r))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        num_experts, input_dims, output_dims = self.lora_a.shape[0], self.lora_a.shape[2], self.lora_b.shape[1]
        plain = (self.training and self.dropout_p > 0) or not lowrank.frozen(self.linear)
        if plain:
            merged = False
        elif lowrank.measuring():
            merged = pathchoice.choose(self._paths(x, indices, sorted_indices)) == "merged"
        else:
            merged = lowrank.use_merged(indices.size, input_dims, output_dims, num_experts, self.training)
        if merged:
            return self._merged(x, indices, sorted_indices)
        return self._separate(x, indices, sorted_indices)

    def _separate(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        """The base's output plus the low-rank product. On a frozen dense base, the merged path's backward (the
        input's gradient through the base experts plus the low-rank term, A's and B's in one GEMM each), without
        its merge: what the merged path writes, every expert's weight, grows with the experts, not the tokens."""
        base = self.linear
        if (self.training and self.dropout_p > 0) or not lowrank.frozen(base) or quantization(base) is not None:
            return self._autodiff(x, indices, sorted_indices)
        bias = base.get("bias")
        out_dtype = mx.result_type(x.dtype, base.weight.dtype)
        dtype = gather_mm_dtype(out_dtype)
        weight = lowrank.cast(base.weight, dtype)
        gather = dict(rhs_indices=indices, sorted_indices=sorted_indices)

        @mx.custom_function
        def forward(x, a, b):
            z = mx.gather_mm(x, a.swapaxes(-1, -2), **gather)
            y = mx.gather_mm(x, weight.swapaxes(-1, -2), **gather) + mx.gather_mm(z, b.swapaxes(-1, -2), **gather)
            return (y if bias is None else y + mx.expand_dims(bias[indices], -2).astype(y.dtype),)

        @forward.vjp
        def forward_vjp(primals, cotangents, outputs):
            x, a, b = primals
            return switch_backward(x, a, b, cotangents[0], weight, indices, sorted_indices, True)

        a = self.lora_a.astype(dtype)
        b = (self.scale * self.lora_b).astype(dtype)
        return lowrank.cast(forward(lowrank.cast(x, dtype), a, b)[0], out_dtype)

    def _autodiff(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        """The separate path left to autodiff: with dropout, a base that trains, or a quantized base."""
        y = self.linear(x, indices, sorted_indices=sorted_indices)
        dtype = gather_mm_dtype(y.dtype)
        a_t = self.lora_a.astype(dtype).swapaxes(-1, -2)
        b_t = (self.scale * self.lora_b).astype(dtype).swapaxes(-1, -2)
        z = mx.gather_mm(lowrank.cast(self.dropout(x), dtype), a_t, rhs_indices=indices, sorted_indices=sorted_indices)
        delta = mx.gather_mm(z, b_t, rhs_indices=indices, sorted_indices=sorted_indices)
        return y + lowrank.cast(delta, y.dtype)

    def _paths(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> pathchoice.Candidates:
        """Both paths on random arrays and random routing of this call's shapes, for `pathchoice` to time."""

        def routing():
            chosen = pathchoice.random_like(indices, high=self.num_experts)
            return (mx.sort(chosen.flatten()).reshape(indices.shape) if sorted_indices else chosen, sorted_indices)

        extra = (tuple(indices.shape), sorted_indices)
        paths = ("_separate", "_merged")
        return pathchoice.low_rank_candidates(self, "switch-lora", self.linear, x, paths, extra, routing)

    def _merged(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        base = self.linear
        bias = base.get("bias")
        out_dtype = mx.result_type(x.dtype, dense_weight(base).dtype)
        dtype = gather_mm_dtype(out_dtype)
        quantized = quantization(base) is not None

        def weight(after=None):
            return lowrank.cast(dense_weight(base, after), dtype)

        def merge(a, b, trigger):
            return mx.addmm(weight(trigger), b, lowrank.after(a, trigger))

        def apply(x, w):
            y = mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)
            return y if bias is None else y + mx.expand_dims(bias[indices], -2).astype(y.dtype)

        def backward(x, a, b, dy):
            if quantized:
                return switch_backward(x, a, b, dy, merge(a, b, dy), indices, sorted_indices, False)
            return switch_backward(x, a, b, dy, weight(), indices, sorted_indices, True)

        a = self.lora_a.astype(dtype)
        b = (self.scale * self.lora_b).astype(dtype)
        out = lowrank.merged_matmul(lowrank.cast(x, dtype), a, b, merge, apply, backward)
        return lowrank.cast(out, out_dtype)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        base = self.linear
        weight = fusemath.fused_weight(self.kind, dense_weight(base), self.lora_a, self.lora_b, self.scale)
        return switch_linear(base, weight, dequantize)
