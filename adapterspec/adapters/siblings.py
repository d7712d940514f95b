"""LoRA layers of one parent that read the same input (q/k/v, gate/up) share one low-rank product x·[A₁|A₂|…].

Each adapted linear on the separate path adds GEMMs whose cost at a thousand tokens is mostly fixed (about
20 µs each on an H100, whatever the rank): x·A forward, and dz·Aᵀ and xᵀ·dz backward. Siblings given the
same input array compute those once for all of them, one GEMM each, at the sum of their ranks; their
own parts (the product with B, B's gradient, the base) stay per layer. The function is the same either way.

Which siblings read the same input is seen while the model runs, not assumed from names. The first
sibling called computes the product for itself and every sibling not yet called that takes the separate
path; a sibling called with that same array takes its columns, one called with another array (attention's
o_proj, which reads the heads' output) drops them and takes its own path (the columns computed for it
are wasted: a few kernels of N×r). A sibling called a second time starts a new round, and from then on a
product covers only the siblings that shared the caller's input in the round before.

Their backward passes meet at the product: each sibling's leaves its dy (and dz = dy·Bᵀ) there rather than
giving x a gradient of its own, and the product's computes x's whole gradient in one chain of accumulating
GEMMs, dy₁·W₁ + dy₂·W₂ + … + dZ·[A…]ᵀ, where autodiff would add up one gradient per sibling (three
rows × in additions for q/k/v, that the base model alone also runs). The product is laid out transposed,
[A…]ᵀ·rows(x)ᵀ, so that each sibling's columns are a contiguous block that GEMMs read in place (a column
slice of rows(x)·[A…] is copied before every GEMM that reads it).
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple, Optional

import mlx.core as mx

from . import lowrank


class Siblings:
    """The LoRA layers of one parent module, which of them read the same input, and the columns of the
    last shared product not yet taken."""

    def __init__(self, members):
        self.members = list(members)
        self._round: dict[int, int] = {}  # id(member) -> id(its input), for the members called this round
        self._partners: dict[int, frozenset[int]] = {}  # id(member) -> the members given its input last round
        self._input: Optional[mx.array] = None
        self._parts: dict[int, Share] = {}
        self._last: Optional[SharedProduct] = None  # the latest product, whose backward may be left unfinished
        self._offering = False  # a product is being planned: the siblings asked may share it

    def arrive(self, member, x: mx.array) -> None:
        """Note that `member` is called with x. A member called again starts a new round (what the last one
        showed is learned); a product waiting for it on another input will not be taken (it is dropped)."""
        me = id(member)
        if me in self._round:
            self._learn()
        self._round[me] = id(x)
        if me in self._parts and self._input is not x:
            self._input, self._parts = None, {}

    def may_share(self, member) -> bool:
        """Whether `member` can get columns of a shared product: one is waiting for it or being planned, or a
        sibling not yet called this round may share its input."""
        if self._offering or id(member) in self._parts:
            return True
        return any(self._may_share(member, m) for m in self.members if m is not member)

    def product(self, member, x: mx.array, dtype: mx.Dtype) -> Optional[Share]:
        """`member`'s columns of rows(x)·[A…] in `dtype`, computed with its siblings' in one GEMM, and where its
        backward leaves what x's gradient needs; None where no sibling may share x with it."""
        me = id(member)
        if self._input is not x or me not in self._parts:
            self._input, self._parts = None, {}
            self._offering = True
            try:
                candidates = [m for m in self.members if self._may_share(member, m)]
                sharers = [member] + [m for m in candidates if m.shares_product(x, dtype)]
            finally:
                self._offering = False
            if len(sharers) < 2:
                return None
            if self._last is not None:
                self._last.forget()  # a backward of the product before that never reached it (a frozen A)
            self._last, parts = shared_product(x, [m.lora_a for m in sharers], dtype)
            self._input = x
            self._parts = {id(m): Share(self._last, slot, part) for slot, (m, part) in enumerate(zip(sharers, parts))}
        part = self._parts.pop(me)
        if not self._parts:
            self._input = None  # every sharer has its columns: hold no array past the call
        return part

    def _may_share(self, member, other) -> bool:
        """Whether `other`, a sibling not yet called this round, may be given `member`'s input: it was in
        the round before (or no round is complete yet)."""
        if other is member or id(other) in self._round:
            return False
        partners = self._partners.get(id(member))
        return partners is None or id(other) in partners

    def _learn(self) -> None:
        """Close the round: the members given the same input in it are partners from now on."""
        by_input: dict[int, set[int]] = {}
        for member, given in self._round.items():
            by_input.setdefault(given, set()).add(member)
        self._partners = {member: frozenset(group) for group in by_input.values() for member in group}
        self._round = {}


def link(adapters) -> list[Siblings]:
    """Group the plain LoRA linears among `(path, adapter)` pairs by parent module and input size; every
    group of two or more learns of its siblings. Returns the groups."""
    by_parent: dict[tuple[str, int], list] = {}
    for path, adapter in adapters:
        if getattr(adapter, "kind", None) == "lora":  # `lora.LoRALinear` (DoRA's layer is "dora")
            parent = path.rpartition(".")[0]
            by_parent.setdefault((parent, adapter.lora_a.shape[0]), []).append(adapter)
    groups = []
    for members in by_parent.values():
        if len(members) > 1:
            group = Siblings(members)
            for member in members:
                member.sibling_group = group
            groups.append(group)
    return groups


class SharedProduct:
    """rows(x)·[A₁|A₂|…] for sibling layers, and the backward they meet in: each sibling's backward leaves
    its dy and dz there, and the product's turns them into the gradients of x and of [A…]."""

    def __init__(self, widths: list[int]):
        self.widths = widths
        self.left: dict[int, tuple] = {}  # slot -> (dy rows, dz, base_dx, dense base weight or None)

    def leave(self, slot: int, dy: mx.array, dz: mx.array, base_dx, weight: Optional[mx.array]) -> None:
        self.left[slot] = (dy, dz, base_dx, weight)

    def forget(self) -> None:
        self.left = {}

    def transposed(self, x: mx.array, a: mx.array) -> mx.array:
        """[A…]ᵀ·rows(x)ᵀ, (Σr, rows), differentiated by `backward`."""

        @mx.custom_function
        def product(x, a):
            return (a.T @ lowrank.rows(x).T,)

        @product.vjp
        def product_vjp(primals, cotangents, outputs):
            return self.backward(*primals)  # what reaches the product by autodiff is left unused, never computed

        return product(x, a)[0]

    def backward(self, x: mx.array, a: mx.array) -> tuple[mx.array, mx.array]:
        """dx = Σ base_dx(dyᵢ) + dZ·[A…]ᵀ, accumulated GEMM after GEMM where bases are dense, and d[A…] = rows(x)ᵀ·dZ,
        dZ the siblings' dz side by side (zeros for a sibling whose output had no gradient)."""
        left, self.left = self.left, {}
        xr = lowrank.rows(x)
        blocks = [left[slot][1] if slot in left else mx.zeros((xr.shape[0], width), a.dtype)
                  for slot, width in enumerate(self.widths)]  # fmt: skip
        dz = mx.concatenate(blocks, axis=1)
        dx = None
        for dy, _, base_dx, weight in (left[slot] for slot in sorted(left)):
            if dx is None:
                dx = base_dx(dy)
            elif weight is not None:
                dx = mx.addmm(dx, dy, weight)
            else:
                dx = dx + base_dx(dy)
        dx = dz @ a.T if dx is None else mx.addmm(dx, dz, a.T)
        return dx.reshape(x.shape), xr.T @ dz


class Share(NamedTuple):
    """One sibling's columns of a shared product (rows × r, read in place), and where its backward leaves dy."""

    product: SharedProduct
    slot: int
    z: mx.array

    def leave(self, base_dx, weight: Optional[mx.array] = None):
        """The function a sibling's backward calls with (dy rows, dz): base_dx(dy) (`weight`, a dense base's,
        lets the product accumulate dy·W in a GEMM) joins x's gradient at the product."""
        return functools.partial(self.product.leave, self.slot, base_dx=base_dx, weight=weight)


def shared_product(x: mx.array, matrices: list[mx.array], dtype: mx.Dtype) -> tuple[SharedProduct, list[mx.array]]:
    """rows(x)·[A₁|A₂|…] in `dtype` in one GEMM, and each matrix's columns of it (transposed views of contiguous
    blocks). Backward, one GEMM each for x's low-rank part and [A…]'s gradient (cast back to each A's dtype
    by the concatenation's own gradient)."""
    product = SharedProduct([m.shape[1] for m in matrices])
    a = mx.concatenate(matrices, axis=1).astype(dtype)
    zt = product.transposed(lowrank.cast(x, dtype), a)
    starts = [0, *itertools.accumulate(product.widths)]
    return product, [zt[start:end].T for start, end in zip(starts, starts[1:])]
