"""LoRA on an Embedding / QuantizedEmbedding, including `as_linear` for tied output heads."""

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


class LoRAEmbedding(AdapterModule):
    """A frozen embedding at `.embedding` plus float32 `lora_a` (num, r) and `lora_b` (r, dims)."""

    kind = "embedding-lora"
    base_name = "embedding"

    def __init__(
        self, base: nn.Module, r: int = 8, scale: float = 20.0, dropout: float = 0.0, freeze_base: bool = True
    ):
        super().__init__(base, scale, dropout, freeze_base)
        num_embeddings, dims = base.weight.shape[0], last_dim(base)
        self.lora_a = low_rank_init((num_embeddings, r), fan_in=num_embeddings)
        self.lora_b = mx.zeros((r, dims))

    def __call__(self, ids: mx.array) -> mx.array:
        y = self.embedding(ids)
        dtype = y.dtype
        a_rows = self.lora_a[ids].astype(dtype)
        if self.training and self.dropout_p > 0:
            z = self.dropout(a_rows @ self.lora_b.astype(dtype))
            return y + (self.scale * z).astype(dtype)
        return mx.addmm(y, a_rows, (self.scale * self.lora_b).astype(dtype))

    @property
    def weight(self) -> mx.array:
        """The embedding as the adapted model sees it (base + scale · A·B), for model code that computes a
        tied head as `h @ embed_tokens.weight.T` (seed_oss): the head then changes as `as_linear`'s does."""
        base = dense_weight(self.embedding)
        return base + (self.scale * (self.lora_a @ self.lora_b)).astype(base.dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        num_embeddings, dims = self.lora_a.shape[0], self.lora_b.shape[1]
        plain = (self.training and self.dropout_p > 0) or not lowrank.frozen(self.embedding)
        if plain:
            merged = False
        elif lowrank.measuring():
            merged = pathchoice.choose(self._paths(x)) == "merged"
        else:
            merged = lowrank.use_merged(x.size // dims, dims, num_embeddings, training=self.training)
        if merged:
            return self._merged_as_linear(x)
        return self._separate_as_linear(x)

    def _separate_as_linear(self, x: mx.array) -> mx.array:
        y = self.embedding.as_linear(x)
        dtype = y.dtype
        z = lowrank.cast(self.dropout(x), dtype) @ (self.scale * self.lora_b).T.astype(dtype)
        return mx.addmm(y, z, self.lora_a.T.astype(dtype))

    def _paths(self, x: mx.array) -> pathchoice.Candidates:
        """Both ways of the tied head on random arrays of this call's shapes, for `pathchoice` to time."""
        paths = ("_separate_as_linear", "_merged_as_linear")
        return pathchoice.low_rank_candidates(self, "embedding-lora", self.embedding, x, paths)

    def _merged_as_linear(self, x: mx.array) -> mx.array:
        base = self.embedding
        dtype = mx.result_type(x.dtype, dense_weight(base).dtype)
        quantized = quantization(base) is not None

        def weight(after=None):
            return lowrank.cast(dense_weight(base, after), dtype)

        def merge(a, b, trigger):
            return mx.addmm(weight(trigger), lowrank.after(a, trigger), b)

        def apply(x, w):
            return x @ w.T

        def backward(x, a, b, dy):
            if quantized:
                return as_linear_backward(x, a, b, dy, merge(a, b, dy), low_rank_dx=False)
            return as_linear_backward(x, a, b, dy, weight(), low_rank_dx=True)

        a = self.lora_a.astype(dtype)
        b = (self.scale * self.lora_b).astype(dtype)
        return lowrank.merged_matmul(lowrank.cast(x, dtype), a, b, merge, apply, backward)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        base = self.embedding
        weight = fusemath.fused_weight(self.kind, dense_weight(base), self.lora_a, self.lora_b, self.scale)
        return dense_or_requantized_embedding(base, weight, dequantize)


def as_linear_backward(x, a, b, dy, weight, low_rank_dx: bool):
    """Gradients of x·(W + a·b)ᵀ, a and b through the low-rank path; x through `weight`: the merged weight, or with
    `low_rank_dx` the base weight W, the low-rank term (dy·a)·b added in one addmm."""
    x_rows, dy_rows = lowrank.rows(x), lowrank.rows(dy)
    u = dy_rows @ a
    dx = dy @ weight
    if low_rank_dx:
        dx = mx.addmm(lowrank.rows(dx), u, b).reshape(dx.shape)
    da = dy_rows.T @ (x_rows @ b.T)
    db = u.T @ x_rows
    return dx, da, db


def dense_or_requantized_embedding(base: nn.Module, weight: mx.array, dequantize: bool) -> nn.Module:
    """A plain Embedding holding `weight`, requantized like the base unless told not to."""
    fused = nn.Embedding(*weight.shape)
    fused.weight = weight
    q = quantization(base)
    if q is not None and not dequantize:
        fused = nn.QuantizedEmbedding.from_embedding(fused, **q)
    return fused
