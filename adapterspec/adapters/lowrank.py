"""Fast low-rank paths shared by the adapters: activation-dtype math and merged-weight matmuls.

Two ways to compute base(x) + x·A·B (scale folded into B, all in the activation dtype):

* separate: the base output plus the low-rank product, accumulated with one `addmm`. Its extra
  memory traffic grows with the number of tokens (it reads x and rewrites the output).
* merged: one matmul with W + (A·B)ᵀ, merged in a single `addmm` over the weight. Its extra
  traffic grows with the weight's size, not with the tokens. Its backward pass sends the input's
  gradient through the merged weight and gets A's and B's gradients from the low-rank path
  alone, so no full-size weight gradient is ever formed. The forward output is that of the base
  with the adapter fused in the base dtype.

`use_merged` picks the one that moves fewer bytes; dropout (which acts on the low-rank input only)
always takes the separate path.
"""

from typing import Callable

import mlx.core as mx

MERGE_MODES = ("auto", "always", "never")
merge_mode = "auto"


def cast(x: mx.array, dtype: mx.Dtype) -> mx.array:
    return x if x.dtype == dtype else x.astype(dtype)


def use_merged(rows: int, input_dims: int, output_dims: int, matrices: int = 1, training: bool = True) -> bool:
    """Whether the merged path moves fewer bytes than the separate one for `rows` input rows.

    Forward only, separate reads x and rereads + rewrites the output: rows·(in + 2·out); merged
    reads + writes the weights: 2·matrices·in·out. A training step adds, beyond the base's own
    backward, rows·(2·out + 5·in) for separate (dy read twice; x read, a second dx written and
    summed) and rows·(2·out + 2·in) for merged (x and dy read twice each).
    """
    if merge_mode != "auto":
        return merge_mode == "always"
    weights = matrices * input_dims * output_dims
    if training:
        return rows * (output_dims + 2 * input_dims) > weights
    return rows * (input_dims + 2 * output_dims) > 2 * weights


def after(a: mx.array, trigger: mx.array) -> mx.array:
    """`a`, scheduled after `trigger`, so a layer's merged weight is built when the layer runs
    rather than up front (it depends on weights alone)."""
    return mx.depends(a, trigger)


def merged_matmul(
    x: mx.array,
    a: mx.array,
    b: mx.array,
    merge: Callable[[mx.array, mx.array], mx.array],
    apply: Callable[[mx.array, mx.array], mx.array],
    backward: Callable[..., tuple[mx.array, mx.array, mx.array]],
) -> mx.array:
    """apply(x, merge(a, b)), differentiated by `backward(x, a, b, cotangent, merged) -> (dx, da, db)`.

    The merged weight is kept from the forward pass for the backward one. `backward` is written
    out by hand: nested `mx.vjp` calls would walk the whole graph upstream of x for every layer.
    Arrays the callables close over (base weight, bias, indices) are constants.
    """

    @mx.custom_function
    def forward(x, a, b):
        merged = merge(after(a, x), b)
        return apply(x, merged), merged

    @forward.vjp
    def forward_vjp(primals, cotangents, outputs):
        x, a, b = primals
        return backward(x, a, b, cotangents[0], outputs[1])

    return forward(x, a, b)[0]


def rows(x: mx.array) -> mx.array:
    """All leading axes folded into one: (..., d) -> (n, d)."""
    return x.reshape(-1, x.shape[-1])


def sum_to_shape(x: mx.array, shape: tuple[int, ...]) -> mx.array:
    """Sum `x` over the axes along which an array of `shape` was broadcast to x's shape."""
    lead = x.ndim - len(shape)
    if lead:
        x = x.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x
