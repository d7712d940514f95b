"""Sibling LoRA linears on dense bases stacked into one weight (their own weights views of it), to run as one layer.

q/k/v (and gate/up) read the same x. Taken one by one, with their low-rank product shared (`siblings`), they
run 1 + 2n GEMMs forward and 2 + 3n backward; packed, with their base weights stacked into one matrix
[W₁; W₂; …] and the B's laid out block-diagonally, 3 forward and 5 backward, whatever n: at a thousand
tokens a step waits on the host queuing its GEMMs (about 15 µs each), and the bases' own GEMMs are fewer
than a frozen model's. The price is one concatenation of the outputs' gradients (rows × Σout), which grows
with the tokens: where that loses, the layers keep the shared path (the choice is measured, `pathchoice`). The
function itself is `lowrank.packed_linears`; this module holds the stack.

The stack costs no memory: once built, each linear's weight (and bias) is a view of its rows (`Stack`). A
linear whose weight or bias is then assigned from Python (`load_weights`, `set_dtype`, `update`, an attribute)
lets the stack go, and its siblings are no longer packed; `mx.compile` puts its tracers in place without
passing there, so a compiled step packs as an eager one does.

The off-diagonal blocks of B's gradient are computed and dropped (rank·Σout per row, a few percent of a GEMM
with the base). The function is the same as the layers' one by one; the rounding differs only in the order in
which each output's terms are added (every output is rounded once, as on the shared path).
"""

from __future__ import annotations

import copyreg
import itertools
from typing import Optional

import mlx.core as mx
import mlx.nn as nn


class StackedLinear(nn.Linear):
    """An `nn.Linear` whose weight and bias are views of a `Stack`; assigning either from Python releases the stack."""

    def __setitem__(self, key, value):
        stack = self.__dict__.get("_stack")
        if stack is not None and key in ("weight", "bias") and self.get(key) is not value:
            stack.release()
        super().__setitem__(key, value)

    def __reduce_ex__(self, protocol):
        """A copy (`copy`, `deepcopy`, pickle) is a plain `nn.Linear` outside the stack: building it must not
        release the stack, nor may assigning to it later."""
        state = {key: value for key, value in self.__dict__.items() if key != "_stack"}
        return copyreg.__newobj__, (nn.Linear,), state, None, iter(self.items())


class Stack:
    """Dense linears of one parent with one input size, stacked: the rows of one weight (and bias) hold theirs in
    order, and each linear's own arrays become views of its rows (no memory is added once the originals go)."""

    def __init__(self, linears: list[nn.Linear]):
        self.linears = list(linears)
        widths = [linear.weight.shape[0] for linear in self.linears]
        self.offsets = [0, *itertools.accumulate(widths)]
        self.weight: Optional[mx.array] = mx.concatenate([linear.weight for linear in self.linears])
        has_bias = "bias" in self.linears[0]
        self.bias = mx.concatenate([linear.bias for linear in self.linears]) if has_bias else None
        mx.eval(self.weight, self.bias)
        for linear, start, stop in zip(self.linears, self.offsets, self.offsets[1:]):
            linear.weight = self.weight[start:stop]
            if has_bias:
                linear.bias = self.bias[start:stop]
            mx.eval(linear.parameters())
            linear.__class__ = StackedLinear
            linear._stack = self

    @staticmethod
    def stackable(linears: list[nn.Module]) -> bool:
        """Whether the modules are plain dense linears of one input size and dtype, all with a bias or none."""
        return (
            len(linears) > 1
            and all(type(m) is nn.Linear for m in linears)
            and len({(m.weight.shape[1], m.weight.dtype, "bias" in m) for m in linears}) == 1
            and all("bias" not in m or m.bias.dtype == m.weight.dtype for m in linears)
        )

    def release(self) -> None:
        """Stop packing: a linear's arrays no longer are the stack's rows."""
        self.weight = self.bias = None
        for linear in self.linears:
            linear.__dict__.pop("_stack", None)

    def rows_of(self, linears: list) -> Optional[tuple[mx.array, Optional[mx.array]]]:
        """The stacked weight and bias of `linears`, a run of consecutive stacked linears in order; None where they
        are not one, or the stack was released."""
        if self.weight is None:
            return None
        indices = []
        for linear in linears:
            found = [i for i, stacked in enumerate(self.linears) if stacked is linear]
            if not found:
                return None
            indices.append(found[0])
        if indices != list(range(indices[0], indices[0] + len(indices))):
            return None
        start, stop = self.offsets[indices[0]], self.offsets[indices[-1] + 1]
        if (start, stop) == (0, self.offsets[-1]):
            return self.weight, self.bias
        return self.weight[start:stop], None if self.bias is None else self.bias[start:stop]
