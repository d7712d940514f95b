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
"""

from __future__ import annotations

import itertools
from typing import Optional

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
        self._parts: dict[int, mx.array] = {}
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

    def product(self, member, x: mx.array, dtype: mx.Dtype) -> Optional[mx.array]:
        """`member`'s columns of rows(x)·[A…] in `dtype`, computed with its siblings' in one GEMM; None where
        no sibling may share x with it."""
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
            parts = shared_product(x, [m.lora_a for m in sharers], dtype)
            self._input, self._parts = x, {id(m): part for m, part in zip(sharers, parts)}
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


def shared_product(x: mx.array, matrices: list[mx.array], dtype: mx.Dtype) -> list[mx.array]:
    """rows(x)·[A₁|A₂|…] in one GEMM, split back into each matrix's columns. Backward, one GEMM each:
    dx = dZ·[A…]ᵀ, d[A…] = rows(x)ᵀ·dZ (cast back to each A's dtype by the concatenation's own gradient)."""
    a = mx.concatenate(matrices, axis=1).astype(dtype)
    z = _product(lowrank.cast(x, dtype), a)[0]
    return mx.split(z, list(itertools.accumulate(m.shape[1] for m in matrices[:-1])), axis=-1)


@mx.custom_function
def _product(x, a):
    return (lowrank.rows(x) @ a,)


@_product.vjp
def _product_vjp(primals, cotangents, outputs):
    x, a = primals
    dz = cotangents[0]
    return (dz @ a.T).reshape(x.shape), lowrank.rows(x).T @ dz
