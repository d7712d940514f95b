"""Array-only math for merging low-rank adapters into base weights (no modules needed)."""

import mlx.core as mx

from ..model.kinds import DORA_KINDS, EMBEDDING_KINDS, LINEAR_KINDS, SWITCH_KINDS


def lora_delta(kind: str, lora_a: mx.array, lora_b: mx.array, scale: float, dtype=mx.float32) -> mx.array:
    """ΔW = scale·(B·A) in the base weight's layout, computed in float32 and cast to `dtype`.

    linear / dora: lora_a (in, r), lora_b (r, out) -> (out, in)
    switch-lora / switch-dora: lora_a (E, r, in), lora_b (E, out, r) -> (E, out, in)
    embedding-lora / dora-embedding: lora_a (num, r), lora_b (r, dims) -> (num, dims)
    """
    a = lora_a.astype(mx.float32)
    b = lora_b.astype(mx.float32)
    if kind in LINEAR_KINDS:
        delta = (a @ b).T
    elif kind in SWITCH_KINDS:
        delta = b @ a
    elif kind in EMBEDDING_KINDS:
        delta = a @ b
    else:
        raise ValueError(f"unknown adapter kind {kind!r}")
    return (scale * delta).astype(dtype)


def fused_weight(kind: str, weight: mx.array, lora_a: mx.array, lora_b: mx.array, scale: float) -> mx.array:
    """W + ΔW, summed in float32 and rounded once to the dtype of the (dense) base weight."""
    summed = weight.astype(mx.float32) + lora_delta(kind, lora_a, lora_b, scale)
    return summed.astype(weight.dtype)


def row_norms(weight: mx.array) -> mx.array:
    """Float32 norm of every row (output row of a linear weight, embedding vector of an embedding)."""
    return mx.linalg.norm(weight.astype(mx.float32), axis=-1)


def dora_fused_weight(
    kind: str, weight: mx.array, lora_a: mx.array, lora_b: mx.array, m: mx.array, scale: float
) -> mx.array:
    """DoRA merge: m · (W + ΔW) / ‖W + ΔW‖ per row, in float32, cast to the base weight's dtype."""
    if kind not in DORA_KINDS:
        raise ValueError(f"{kind!r} is not a DoRA kind")
    adapted = weight.astype(mx.float32) + lora_delta(kind, lora_a, lora_b, scale)
    magnitude = m.astype(mx.float32) / row_norms(adapted)
    return (magnitude[..., None] * adapted).astype(weight.dtype)
