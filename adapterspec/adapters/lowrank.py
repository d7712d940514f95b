"""Fast low-rank paths shared by the adapters: activation-dtype math and merged-weight matmuls.

Two ways to compute base(x) + x·A·B (scale folded into B, all in the activation dtype):

* separate: the base output plus the low-rank product (`Base`: on a dense base the product is added by the
  base's own GEMM, elsewhere by one `addmm` after it). Its extra memory traffic grows with the number of
  tokens (it reads x, and writes the product's term or rewrites the output).
* merged: one matmul with W + (A·B)ᵀ, merged in a single `addmm` over the weight. Its extra
  traffic grows with the weight's size, not with the tokens. No full-size weight gradient is ever
  formed, and no merged or dequantized weight is kept for the backward pass (keeping them cost a
  full copy of every adapted weight, 9 GB at 32 blocks of 4096, above mlx-lm's peak): the input's
  gradient goes through the base weight plus the low-rank path (dense base: dy·W + (dy·Bᵀ)·Aᵀ), or
  through the merged weight built again (quantized base), and A's and B's gradients come from the
  low-rank path alone. The forward output is that of the base with the adapter fused in the base dtype.

Both are custom functions with hand-written backward passes: a compiled step then holds a few
kernels per adapted layer, not the dozens of reshapes, copies and sums autodiff leaves. Siblings that read one
x (q/k/v, gate/up) can also run as one such function on their stacked bases (`packed_linears`; `packed`,
`siblings`).

`use_merged` picks one per `merge_mode`: "auto" measures the candidates on a GPU (`pathchoice`, once
per shape) and models bytes moved on the CPU, so tests and CI take a deterministic path; "measure"
and "model" force either way of choosing, "always" and "never" force a path. The environment
variable ADAPTERSPEC_LORA_PATH sets the mode a process starts with. Dropout (which acts on the
low-rank input only) and a base left trainable always take the plain separate path.
"""

import itertools
import os
from typing import Callable

import mlx.core as mx

MERGE_MODES = ("auto", "always", "never", "measure", "model")
PACK_MODES = ("auto", "always", "never")


def mode_from_environment(variable: str, default: str, modes: tuple[str, ...]) -> str:
    """The mode an environment variable sets, or `default`; a UserError for any other value."""
    value = os.environ.get(variable, default)
    if value not in modes:
        from ..errors import UserError

        raise UserError(
            f"{variable}={value!r} is not one of {', '.join(modes)}",
            help=f"unset {variable} for '{default}', or set it to one of those",
        )
    return value


merge_mode = mode_from_environment("ADAPTERSPEC_LORA_PATH", "auto", MERGE_MODES)
separate_by_hand = True  # False leaves the separate path to autodiff (benchmarks compare the two)
share_siblings = True  # False gives every layer its own low-rank product (`siblings`; benchmarks and tests compare)
sum_in_base = True  # False adds a dense base's low-rank term after its GEMM (`DenseBase`; benchmarks compare)
# siblings on dense bases packed into one (`packed`): "auto" measures it against sharing on a GPU, for calls of at
# most PACK_MAX_ROWS rows: above them the H100 sweep found packed steps 1-3 % slower although each run alone timed
# faster packed, at 1×1024 tokens 16 % faster (docs/benchmarks.md)
pack_siblings = mode_from_environment("ADAPTERSPEC_PACK_SIBLINGS", "auto", PACK_MODES)
PACK_MAX_ROWS = 2048


def cast(x: mx.array, dtype: mx.Dtype) -> mx.array:
    return x if x.dtype == dtype else x.astype(dtype)


def measuring() -> bool:
    """Whether path choices are measured now (mode "measure", or "auto" on a GPU)."""
    return merge_mode == "measure" or (merge_mode == "auto" and mx.default_device().type == mx.DeviceType.gpu)


def use_merged(rows: int, input_dims: int, output_dims: int, matrices: int = 1, training: bool = True) -> bool:
    """Whether to take the merged path when it is not measured: forced, or where the merged path moves fewer
    bytes than the separate one for `rows` input rows (the layers ask `pathchoice` while `measuring()`).

    Forward only, separate reads x and rereads + rewrites the output: rows·(in + 2·out); merged
    reads + writes the weights: 2·matrices·in·out. A training step adds, beyond the base's own
    backward, rows·(2·out + 5·in) for separate (dy read twice; x read, a second dx written and
    summed) and rows·(2·out + 2·in) for merged (x and dy read twice each).
    """
    if merge_mode in ("always", "never"):
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
    merge: Callable[[mx.array, mx.array, mx.array], mx.array],
    apply: Callable[[mx.array, mx.array], mx.array],
    backward: Callable[..., tuple[mx.array, mx.array, mx.array]],
) -> mx.array:
    """apply(x, merge(a, b, x)), differentiated by `backward(x, a, b, cotangent) -> (dx, da, db)`.

    `merge(a, b, trigger)` builds the merged weight once `trigger` is computed. It lives only while the
    forward pass uses it; a backward that needs it builds it again, after its cotangent. `backward` is
    written out by hand: nested `mx.vjp` calls would walk the whole graph upstream of x for every layer.
    Arrays the callables close over (bias, indices) are constants; they reach a base weight through its
    module, so that a dequantized copy is made where it is used, never kept.
    """

    @mx.custom_function
    def forward(x, a, b):
        return (apply(x, merge(a, b, x)),)

    @forward.vjp
    def forward_vjp(primals, cotangents, outputs):
        x, a, b = primals
        return backward(x, a, b, cotangents[0])

    return forward(x, a, b)[0]


def separate_matmul(
    x: mx.array,
    a: mx.array,
    b: mx.array,
    base: "Base",
) -> mx.array:
    """base(x) + (x·a)·b with its backward written out: dz = dy·bᵀ, dx = base_dx(dy) + dz·aᵀ, da = xᵀ·dz,
    db = zᵀ·dy, the narrow products on rows (no reshape of their own), z kept from the forward pass. The base's
    arrays are constants."""

    @mx.custom_function
    def forward(x, a, b):
        z = rows(x) @ a
        return base.plus_product(x, z, b), z

    @forward.vjp
    def forward_vjp(primals, cotangents, outputs):
        x, a, b = primals
        dy, z = cotangents[0], outputs[1]
        dy_rows = rows(dy)
        dz = dy_rows @ b.T
        return base.dx_plus_product(dy, dz, a.T), rows(x).T @ dz, z.T @ dy_rows

    return forward(x, a, b)[0]


def separate_with_product(x: mx.array, z: mx.array, b: mx.array, base: "Base") -> mx.array:
    """base(x) + z·b for a low-rank product z = rows(x)·a computed elsewhere (`siblings`), which carries a's
    part of x's gradient: here dx = base_dx(dy), dz = dy·bᵀ, db = zᵀ·dy. The base's arrays are constants."""

    @mx.custom_function
    def forward(x, z, b):
        return (base.plus_product(x, z, b),)

    @forward.vjp
    def forward_vjp(primals, cotangents, outputs):
        x, z, b = primals
        dy = cotangents[0]
        dy_rows = rows(dy)
        return base.dx(dy), dy_rows @ b.T, z.T @ dy_rows

    return forward(x, z, b)[0]


def block_diagonal(blocks: list[mx.array], scales=None, dtype=None) -> mx.array:
    """The blocks (rᵢ × nᵢ), each times its scale (default 1), on the diagonal of a (Σr × Σn) matrix in `dtype` (the
    blocks' by default), zeros elsewhere. Blocks of one height take two kernels whatever their number (a
    concatenation, then one fused select-scale-cast over it repeated once per block); others a fill and a slice
    update per block."""
    scales = [1.0] * len(blocks) if scales is None else list(scales)
    dtype = blocks[0].dtype if dtype is None else dtype
    heights, widths = [b.shape[0] for b in blocks], [b.shape[1] for b in blocks]
    if len(set(heights)) == 1:
        in_block, scale_row = _block_masks(tuple(widths), tuple(float(s) for s in scales))
        repeated = mx.where(in_block, mx.concatenate(blocks, axis=1) * scale_row, 0.0)  # (k, r, Σn)
        return repeated.astype(dtype).reshape(sum(heights), sum(widths))
    out = mx.zeros((sum(heights), sum(widths)), dtype)
    r = n = 0
    for b, s in zip(blocks, scales):
        out[r : r + b.shape[0], n : n + b.shape[1]] = (s * b).astype(dtype)
        r, n = r + b.shape[0], n + b.shape[1]
    return out


_BLOCK_MASKS: dict = {}


def _block_masks(widths: tuple[int, ...], scales: tuple[float, ...]) -> tuple[mx.array, mx.array]:
    """For blocks of these widths: which columns are block j's, for each j (k × 1 × Σn, bool), and each column's
    block's scale (1 × Σn, float32); made once per widths and scales (in a compiled step they are constants)."""
    key = (widths, scales)
    if key not in _BLOCK_MASKS:
        owner = [j for j, w in enumerate(widths) for _ in range(w)]
        in_block = mx.array([[[o == j for o in owner]] for j in range(len(widths))])
        scale_row = mx.array([[scales[o] for o in owner]], dtype=mx.float32)
        mx.eval(in_block, scale_row)
        _BLOCK_MASKS[key] = (in_block, scale_row)
    return _BLOCK_MASKS[key]


def packed_linears(x: mx.array, a: mx.array, bs: list[mx.array], scales, weight: mx.array, bias) -> list[mx.array]:
    """[x·Wᵢᵀ (+ biasᵢ) + sᵢ·(x·Aᵢ)·Bᵢ for each i], given the stacked weight [W₁; W₂; …] (Σn × in), its stacked bias
    or None, a = [A₁|A₂|…] (in × Σr) in x's dtype, the masters B₁, B₂, … and their scales sᵢ; every output has x's
    leading axes. Inside, the scaled B's are laid out block-diagonally in x's dtype (b, `block_diagonal`). The
    backward pass is written out: dY = [dy₁|dy₂|…], dZ = dY·bᵀ, dx = dY·W + dZ·aᵀ (one GEMM adds the other as its
    C input), da = xᵀ·dZ, and each Bᵢ's gradient sᵢ times its block of Zᵀ·dY, in the master's dtype (so the
    scale and the cast join the optimizer's kernels in a compiled step). The weight and bias are constants."""
    lead = x.shape[:-1]
    cuts = list(itertools.accumulate(m.shape[1] for m in bs[:-1]))

    @mx.custom_function
    def forward(x, a, *bs):
        x_rows = rows(x)
        b = block_diagonal(list(bs), scales, x.dtype)
        z = x_rows @ a
        term = z @ b if bias is None else mx.addmm(bias, z, b)
        y = mx.addmm(term, x_rows, weight.T)
        return (*(part.reshape(*lead, part.shape[-1]) for part in mx.split(y, cuts, axis=-1)), z, b)

    @forward.vjp
    def forward_vjp(primals, cotangents, outputs):
        x, a, *bs = primals
        z, b = outputs[-2:]
        dy = mx.concatenate([rows(c) for c in cotangents[:-2]], axis=-1)
        dz = dy @ b.T
        dx = mx.addmm(dz @ a.T, dy, weight).reshape(x.shape)
        db = z.T @ dy
        db_blocks = []
        r = n = 0
        for master, scale in zip(bs, scales):
            block = db[r : r + master.shape[0], n : n + master.shape[1]]
            db_blocks.append(scale * block.astype(master.dtype))
            r, n = r + master.shape[0], n + master.shape[1]
        return (dx, rows(x).T @ dz, *db_blocks)

    return list(forward(x, a, *bs)[:-2])


class Base:
    """A frozen linear base as the low-rank paths use it: its output and its input's gradient, each with a
    low-rank term added. On a dense base the term is computed first and added by the base's own GEMM (its C
    input, read where the GEMM writes its tiles), so at many rows no memory-bound pass rereads and rewrites
    the base's output or x's gradient; other bases add it afterwards with one `addmm`."""

    def __init__(self, apply: Callable[[mx.array], mx.array], dx: Callable[[mx.array], mx.array]):
        self.apply, self.dx = apply, dx

    def plus_product(self, x: mx.array, z: mx.array, b: mx.array) -> mx.array:
        """base(x) + z·b, for z with x's leading axes or folded into rows."""
        return _plus_product(self.apply(x), z, b)

    def dx_plus_product(self, dy: mx.array, dz: mx.array, a_t: mx.array) -> mx.array:
        """base_dx(dy) + dz·a_t, for dz with dy's leading axes or folded into rows."""
        return _plus_product(self.dx(dy), dz, a_t)


class DenseBase(Base):
    """A dense linear, x·Wᵀ (+ bias): the low-rank term is added inside the base's GEMM."""

    def __init__(self, weight: mx.array, bias: "mx.array | None"):
        super().__init__(self._apply, self._dx)
        self.weight, self.bias = weight, bias

    def _apply(self, x):
        return x @ self.weight.T if self.bias is None else mx.addmm(self.bias, x, self.weight.T)

    def _dx(self, dy):
        return (rows(dy) @ self.weight).reshape(*dy.shape[:-1], self.weight.shape[1])

    def plus_product(self, x, z, b):
        if not sum_in_base:
            return super().plus_product(x, z, b)
        z = rows(z)
        term = z @ b if self.bias is None else mx.addmm(self.bias, z, b)
        return mx.addmm(term, rows(x), self.weight.T).reshape(*x.shape[:-1], term.shape[-1])

    def dx_plus_product(self, dy, dz, a_t):
        if not sum_in_base:
            return super().dx_plus_product(dy, dz, a_t)
        return mx.addmm(rows(dz) @ a_t, rows(dy), self.weight).reshape(*dy.shape[:-1], a_t.shape[-1])


def _plus_product(y: mx.array, z: mx.array, b: mx.array) -> mx.array:
    """y + z·b in one `addmm`; a z folded into rows adds to y's rows."""
    if z.ndim == 2 and y.ndim != 2:
        return mx.addmm(rows(y), z, b).reshape(y.shape)
    return mx.addmm(y, z, b)


def frozen(module) -> bool:
    """Whether every array the module holds itself is frozen (a custom path's backward gives the base no gradient)."""
    return all(key in module._no_grad for key, value in module.items() if isinstance(value, mx.array))


def output_dtype(module, x: mx.array) -> mx.Dtype:
    """The dtype a (quantized) linear base returns for x: x's promoted with its floating arrays'."""
    dtypes = [v.dtype for v in module.values() if isinstance(v, mx.array) and mx.issubdtype(v.dtype, mx.floating)]
    return mx.result_type(x.dtype, *dtypes) if dtypes else x.dtype


def rows(x: mx.array) -> mx.array:
    """All leading axes folded into one: (..., d) -> (n, d); a matrix as it is (a reshape is an operation the host
    queues in a compiled step, even where it changes nothing)."""
    return x if x.ndim == 2 else x.reshape(-1, x.shape[-1])


def sum_to_shape(x: mx.array, shape: tuple[int, ...]) -> mx.array:
    """Sum `x` over the axes along which an array of `shape` was broadcast to x's shape."""
    lead = x.ndim - len(shape)
    if lead:
        x = x.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x
