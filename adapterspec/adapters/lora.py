"""LoRA on a Linear or QuantizedLinear: y = base(x) + scale · (dropout(x) · A) · B."""

import mlx.core as mx
import mlx.nn as nn

from . import fusemath, lowrank, pathchoice
from .basemodules import (
    AdapterModule,
    dense_weight,
    last_dim,
    low_rank_init,
    quantization,
)
from .packed import StackedLinear


class LoRALinear(AdapterModule):
    """A frozen linear base at `.linear` plus float32 `lora_a` (in, r) and `lora_b` (r, out).

    The low-rank path runs in the base output's dtype; A and B stay float32 masters.
    """

    kind = "lora"
    sibling_group = None  # the `siblings.Siblings` it may share its low-rank product with, set by `siblings.link`

    def __init__(
        self, base: nn.Module, r: int = 8, scale: float = 20.0, dropout: float = 0.0, freeze_base: bool = True
    ):
        super().__init__(base, scale, dropout, freeze_base)
        input_dims, output_dims = last_dim(base), base.weight.shape[0]
        self.lora_a = low_rank_init((input_dims, r), fan_in=input_dims)
        self.lora_b = mx.zeros((r, output_dims))

    def __call__(self, x: mx.array) -> mx.array:
        group = self._sharing_group()
        if group is not None:
            group.arrive(self, x)
        path = self._path(x)
        if path == "merged":
            return self._merged(x)
        if path == "separate":
            return self._separate(x, shared=True)
        return self._autodiff(x)

    def _path(self, x: mx.array) -> str:
        """The path for x: "autodiff" (dropout, a base that trains, a base `_separate` cannot differentiate, or
        the benchmarks' old path), "merged" or "separate". Forced, or in training on a dense base with siblings
        the separate path (its product shared, it runs fewer GEMMs than the merged one), or in eval its run of
        siblings' path where packing may be taken, or measured on a GPU, or modelled."""
        input_dims, output_dims = self.lora_a.shape[0], self.lora_b.shape[1]
        if (self.training and self.dropout_p > 0) or not lowrank.frozen(self.linear):
            return "autodiff"
        if lowrank.merge_mode in ("always", "never"):
            merged = lowrank.merge_mode == "always"
        elif self.training and quantization(self.linear) is None and self._shares():
            merged = False
        elif (run_path := self._run_path(x)) is not None:
            merged = run_path == "merged"
        elif lowrank.measuring():
            merged = pathchoice.choose(self._paths(x)) == "merged"
        else:
            merged = lowrank.use_merged(x.size // input_dims, input_dims, output_dims, training=self.training)
        if merged:
            return "merged"
        if not lowrank.separate_by_hand or getattr(self.linear, "global_scale", None) is not None:
            return "autodiff"
        return "separate"

    def _sharing_group(self):
        """Its siblings, where sharing is on."""
        return self.sibling_group if lowrank.share_siblings else None

    def _run_path(self, x: mx.array):
        """In eval, the path its run of siblings takes (`siblings.Siblings.run_path`); None where it has none."""
        group = self._sharing_group()
        if group is None or self.training:
            return None
        return group.run_path(self, x, lowrank.output_dtype(self.linear, x))

    def _shares(self) -> bool:
        """Whether this layer, called now, may share its low-rank product with a sibling."""
        group = self._sharing_group()
        return group is not None and group.may_share(self)

    def shares_product(self, x: mx.array, dtype: mx.Dtype) -> bool:
        """Whether this layer takes the separate path for x with its low-rank product in `dtype`."""
        return self._path(x) == "separate" and lowrank.output_dtype(self.linear, x) == dtype

    def _autodiff(self, x: mx.array) -> mx.array:
        """The separate path left to autodiff: with dropout, or a base that trains too."""
        y = self.linear(x)
        dtype = y.dtype
        z = lowrank.cast(self.dropout(x), dtype) @ self.lora_a.astype(dtype)
        return mx.addmm(y, z, (self.scale * self.lora_b).astype(dtype))

    def _separate(self, x: mx.array, shared: bool = False) -> mx.array:
        """The separate path; with `shared`, on the product its siblings computed for the same x where they did."""
        base = self.linear
        q = quantization(base)
        if type(base) in (nn.Linear, StackedLinear):
            frozen_base = lowrank.DenseBase(base.weight, base.get("bias"))
        elif q is None:
            weight = base.weight
            frozen_base = lowrank.Base(base, lambda dy: dy @ weight)
        elif getattr(base, "global_scale", None) is None:

            def base_dx(dy):
                return mx.quantized_matmul(dy, base.weight, base.scales, base.get("biases"), transpose=False, **q)

            frozen_base = lowrank.Base(base, base_dx)
        else:
            return self._autodiff(x)
        dtype = lowrank.output_dtype(base, x)
        b = (self.scale * self.lora_b).astype(dtype)
        group = self._sharing_group() if shared else None
        if group is not None and type(frozen_base) is lowrank.DenseBase:
            y = group.packed_output(self, x, dtype)
            if y is not None:
                return y
        z = group.product(self, x, dtype) if group is not None else None
        if z is not None:
            return lowrank.separate_with_product(lowrank.cast(x, dtype), z, b, frozen_base)
        a = self.lora_a.astype(dtype)
        return lowrank.separate_matmul(lowrank.cast(x, dtype), a, b, frozen_base)

    def _paths(self, x: mx.array) -> pathchoice.Candidates:
        """Both paths on random arrays of this call's shapes, for `pathchoice` to time."""
        return pathchoice.low_rank_candidates(self, "lora", self.linear, x, ("_separate", "_merged"))

    def _merged(self, x: mx.array) -> mx.array:
        base = self.linear
        bias = base.get("bias")
        dtype = mx.result_type(x.dtype, dense_weight(base).dtype)
        quantized = quantization(base) is not None

        def weight(after=None):
            return lowrank.cast(dense_weight(base, after), dtype)

        def merge(a, b, trigger):
            return mx.addmm(weight(trigger), b.T, lowrank.after(a, trigger).T)

        def apply(x, w):
            return x @ w.T if bias is None else mx.addmm(bias, x, w.T)

        def backward(x, a, b, dy):
            if quantized:  # dequantizing again costs as much as merging: dy goes through the merged weight
                return linear_backward(x, a, b, dy, merge(a, b, dy), low_rank_dx=False)
            return linear_backward(x, a, b, dy, weight(), low_rank_dx=True)

        a = self.lora_a.astype(dtype)
        b = (self.scale * self.lora_b).astype(dtype)
        return lowrank.merged_matmul(lowrank.cast(x, dtype), a, b, merge, apply, backward)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        base = self.linear
        weight = fusemath.fused_weight(self.kind, dense_weight(base), self.lora_a, self.lora_b, self.scale)
        return dense_or_requantized_linear(base, weight, dequantize)


def linear_backward(x, a, b, dy, weight, low_rank_dx: bool):
    """Gradients of x·(W + (a·b)ᵀ)ᵀ, a and b through the low-rank path; x through `weight`: the merged weight, or
    with `low_rank_dx` the base weight W, the low-rank term (dy·bᵀ)·aᵀ added by the same GEMM (`lowrank.DenseBase`)."""
    x_rows, dy_rows = lowrank.rows(x), lowrank.rows(dy)
    dz = dy_rows @ b.T
    if low_rank_dx:
        dx = lowrank.DenseBase(weight, None).dx_plus_product(dy, dz, a.T)
    else:
        dx = dy @ weight
    da = x_rows.T @ dz
    db = (x_rows @ a).T @ dy_rows
    return dx, da, db


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
