"""Token rows: only the listed rows of an Embedding train (`tokens([...])`, PEFT's `trainable_token_indices`),
also where the tied output head reads them through `as_linear`."""

import mlx.core as mx
import mlx.nn as nn

from .basemodules import dense_weight


class TokenRows(nn.Module):
    """A frozen embedding at `.embedding` plus float32 `token_rows` (n, dims): the values of rows `rows`, in order.

    Those rows read `token_rows`, every other row the base; the values start as the base's rows, so the
    adapted model starts as the base model."""

    kind = "embedding-tokens"

    @classmethod
    def from_base(cls, base: nn.Module, rows, freeze_base: bool = True, **_ignored):
        return cls(base, rows, freeze_base)

    def __init__(self, base: nn.Module, rows, freeze_base: bool = True):
        super().__init__()
        if freeze_base:
            base.freeze()
        self.embedding = base
        weight = dense_weight(base)
        indices = mx.array(list(rows), dtype=mx.int32)
        self.token_rows = weight[indices].astype(mx.float32)
        slots = [-1] * weight.shape[0]
        for slot, row in enumerate(rows):
            slots[row] = slot
        # constants, not parameters: kept out of the module's dict
        object.__setattr__(self, "rows", tuple(int(r) for r in rows))
        object.__setattr__(self, "_indices", indices)
        object.__setattr__(self, "_slots", mx.array(slots, dtype=mx.int32))

    def __call__(self, ids: mx.array) -> mx.array:
        y = self.embedding(ids)
        slot = self._slots[ids]
        picked = self.token_rows[mx.maximum(slot, 0)].astype(y.dtype)
        return mx.where((slot >= 0)[..., None], picked, y)

    @property
    def weight(self) -> mx.array:
        """The embedding as the adapted model sees it, for model code that computes a tied head as `h @ weight.T`."""
        base = dense_weight(self.embedding)
        return self._replace_rows(base, self.token_rows.astype(base.dtype))

    def _replace_rows(self, base: mx.array, values: mx.array) -> mx.array:
        hit = (self._slots >= 0)[:, None]
        return mx.where(hit, values[mx.maximum(self._slots, 0)], base)

    def as_linear(self, x: mx.array) -> mx.array:
        y = self.embedding.as_linear(x)
        columns = x @ self.token_rows.T.astype(x.dtype)  # (..., n): the logits of the listed rows
        spread = columns[..., mx.maximum(self._slots, 0)]
        return mx.where(self._slots >= 0, spread.astype(y.dtype), y)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """A plain Embedding with the rows written in."""
        base = dense_weight(self.embedding)
        fused = nn.Embedding(*base.shape)
        fused.weight = self._replace_rows(base, self.token_rows.astype(base.dtype))
        return fused
