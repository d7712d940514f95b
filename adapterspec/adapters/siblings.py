"""LoRA layers of one parent that read the same input (q/k/v, gate/up) share one low-rank product x·[A₁|A₂|…].

Each adapted linear on the separate path adds GEMMs whose cost at a thousand tokens is mostly fixed (about
20 µs each on an H100, whatever the rank): x·A forward, and dz·Aᵀ and xᵀ·dz backward. Siblings given the
same input array compute those once for all of them, one GEMM each, at the sum of their ranks; their
own parts (the product with B, B's gradient, the base) stay per layer. The function is the same either way.

Which siblings read the same input is seen while the model runs, not assumed from names. The first
sibling called computes the product for itself and every sibling not yet called that takes the separate
path; a sibling called with that same array takes its columns, one called with another array (attention's
o_proj, which reads the heads' output) drops them and takes its own path (the columns computed for it
are wasted: a few kernels of N×r). A round ends when every sibling has been called, or when one is called a
second time; from then on a product covers only the siblings that shared the caller's input in the round
before. Groups alike (the same parent class, names and shapes, e.g. every block's attention) learn from each
other: in a model's first forward pass, the first block's group shows the others which siblings read one input.

Where the siblings' bases are dense linears stacked into one matrix (`packed.Stack`), a sibling first called
with an input its partners share can compute all their outputs at once (`lowrank.packed_linears`), each handed
out when its sibling is called with that same input; whether it does is measured (`pathchoice`) or forced
(`lowrank.pack_siblings`). In eval the measured choice of such a run is packed, shared or each member merged,
and every member follows it.
"""

from __future__ import annotations

import itertools
from typing import Callable, Optional

import mlx.core as mx

from . import lowrank, packed, pathchoice


class Siblings:
    """The LoRA layers of one parent module, which of them read the same input, and the columns of the
    last shared product (or the packed outputs) not yet taken."""

    def __init__(self, members, names, kind, learned: dict):
        self.members = list(members)
        self.names = list(names)
        self._name_of = {id(m): name for m, name in zip(self.members, self.names)}
        self.kind = kind  # groups of one kind learn from each other, through `learned`
        self._learned = learned  # kind -> {name: the names given its input}, shared by the groups of one model
        self.stack: Optional[packed.Stack] = None
        self._round: dict[int, int] = {}  # id(member) -> id(its input), for the members called this round
        self._partners: dict[int, frozenset[int]] = {}  # id(member) -> the members given its input last round
        self._input: Optional[mx.array] = None
        self._parts: dict[int, mx.array] = {}
        self._packed_input: Optional[mx.array] = None
        self._outputs: dict[int, mx.array] = {}
        self._offering = False  # a product is being planned: the siblings asked may share it
        self._complete = False  # every member has been called this round

    def arrive(self, member, x: mx.array) -> None:
        """Note that `member` is called with x. A member called again starts a new round (what the last one
        showed is learned), as does the last member's call; a product or an output waiting for it on another
        input will not be taken (it is dropped)."""
        me = id(member)
        if me in self._round or self._complete:
            if not self._complete:
                self._learn()
            self._round, self._complete = {}, False
        self._round[me] = id(x)
        if me in self._parts and self._input is not x:
            self._input, self._parts = None, {}
        if me in self._outputs and self._packed_input is not x:
            self._packed_input, self._outputs = None, {}
        if len(self._round) == len(self.members):
            self._learn()
            self._complete = True  # the round stays until the next call, so that no sibling counts as not yet called

    def packed_output(self, member, x: mx.array, dtype: mx.Dtype) -> Optional[mx.array]:
        """`member`'s output for x in `dtype`, computed with its partners' by the packed path where it is taken
        (its siblings given x last time, each on the separate path and not yet called, the run of them stacked
        consecutively); None where it is not."""
        me = id(member)
        if self._packed_input is x and me in self._outputs:
            return self._take_output(me)
        run, stacked = self._run_of(member, dtype)
        if run is None or any(m is not member and id(m) in self._round for m in run):
            return None
        self._offering = True
        try:
            if not all(m is member or m.shares_product(x, dtype) for m in run):
                return None
        finally:
            self._offering = False
        weight, bias = stacked
        if self._run_path(run, x, weight, bias, dtype) != "packed":
            return None
        self._packed_input = x
        self._outputs = dict(zip(map(id, run), pack(run, x, weight, bias, dtype)))
        return self._take_output(me)

    def run_path(self, member, x: mx.array, dtype: mx.Dtype) -> Optional[str]:
        """In eval, the path of the run that `member` belongs to (its siblings given its input last time, stacked
        consecutively), which every member of the run follows: "packed" (forced, or measured fastest), "shared" or
        "merged" (measured fastest); None where it has no run, or the choice is left to each layer."""
        if member.training:
            return None  # in training a run on dense bases shares its product: `packed_output` decides packing
        run, stacked = self._run_of(member, dtype)
        if run is None:
            return None
        return self._run_path(run, x, *stacked, dtype)

    def _run_of(self, member, dtype: mx.Dtype):
        """`member`'s run and its stacked weight and bias in `dtype`, where packing may be taken; (None, None)
        where not."""
        if self.stack is None or lowrank.pack_siblings == "never":
            return None, None
        partners = self._partners_of(member)
        if partners is None:
            return None, None
        run = [m for m in self.members if id(m) in partners]
        stacked = self.stack.rows_of([m.linear for m in run]) if len(run) > 1 else None
        if stacked is None or stacked[0].dtype != dtype:
            return None, None
        return run, stacked

    def _run_path(self, run, x, weight, bias, dtype) -> Optional[str]:
        """The run's path: "packed" where forced; measured where path choices are, up to `lowrank.PACK_MAX_ROWS`
        rows (packed or shared in training, those or merged in eval); None where neither (modelled: packing only
        adds bytes moved, the outputs' gradients' concatenation)."""
        if lowrank.pack_siblings == "always":
            return "packed"
        if not lowrank.measuring() or x.size // x.shape[-1] > lowrank.PACK_MAX_ROWS:
            return None
        return pathchoice.choose(packed_candidates(run, x, weight, bias, dtype))

    def _take_output(self, me: int) -> mx.array:
        output = self._outputs.pop(me)
        if not self._outputs:
            self._packed_input = None  # every sibling has its output: hold no array past the call
        return output

    def may_share(self, member) -> bool:
        """Whether `member` can get columns of a shared product or a packed output: one is waiting for it or being
        planned, or a sibling not yet called this round may share its input."""
        if self._offering or id(member) in self._parts or id(member) in self._outputs:
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
        partners = self._partners_of(member)
        return partners is None or id(other) in partners

    def _partners_of(self, member) -> Optional[frozenset[int]]:
        """The members given `member`'s input in the last round: its own, or one of a group alike; None before any."""
        partners = self._partners.get(id(member))
        if partners is None:
            names = self._learned.get(self.kind, {}).get(self._name_of[id(member)])
            if names is not None:
                partners = frozenset(id(m) for m, name in zip(self.members, self.names) if name in names)
        return partners

    def _learn(self) -> None:
        """What the round showed: the members given the same input in it are partners from now on (for the groups
        alike too, unless one of them has already shown its own)."""
        by_input: dict[int, set[int]] = {}
        for member, given in self._round.items():
            by_input.setdefault(given, set()).add(member)
        self._partners = {member: frozenset(group) for group in by_input.values() for member in group}
        if len(self._partners) == len(self.members):
            name_of = self._name_of
            learned = {name_of[m]: frozenset(name_of[p] for p in group) for m, group in self._partners.items()}
            self._learned.setdefault(self.kind, learned)


def link(adapters, parent_of: Optional[Callable[[str], object]] = None) -> list[Siblings]:
    """Group the plain LoRA linears among `(path, adapter)` pairs by parent module and input size; every
    group of two or more learns of its siblings, in the order the parent holds them (`parent_of(path)` gives
    the parent module, where known), and their dense bases are stacked where packing may be taken. Returns
    the groups."""
    by_parent: dict[tuple[str, int], list] = {}
    for path, adapter in adapters:
        if getattr(adapter, "kind", None) == "lora":  # `lora.LoRALinear` (DoRA's layer is "dora")
            parent, _, name = path.rpartition(".")
            by_parent.setdefault((parent, adapter.lora_a.shape[0]), []).append((name, adapter))
    learned: dict = {}
    groups = []
    for (parent_path, _), named in by_parent.items():
        if len(named) < 2:
            continue
        parent = parent_of(parent_path) if parent_of is not None else None
        if parent is not None and hasattr(parent, "keys"):
            order = {key: i for i, key in enumerate(parent.keys())}
            named.sort(key=lambda pair: order.get(pair[0], len(order)))
        names = [name for name, _ in named]
        members = [adapter for _, adapter in named]
        shapes = tuple((tuple(m.lora_a.shape), tuple(m.lora_b.shape)) for m in members)
        group = Siblings(members, names, (type(parent).__name__, tuple(names), shapes), learned)
        for member in members:
            member.sibling_group = group
        if stacking() and packed.Stack.stackable([m.linear for m in members]):
            group.stack = packed.Stack([m.linear for m in members])
        groups.append(group)
    return groups


def stacking() -> bool:
    """Whether linked siblings' bases are stacked for packing: forced, or where path choices are measured."""
    mode = lowrank.pack_siblings
    return mode == "always" or (mode == "auto" and lowrank.measuring())


def pack(run: list, x: mx.array, weight: mx.array, bias, dtype: mx.Dtype) -> list[mx.array]:
    """The outputs of the LoRA layers `run` for x by the packed path, on their stacked weight and bias."""
    a = mx.concatenate([m.lora_a for m in run], axis=1).astype(dtype)
    bs, scales = [m.lora_b for m in run], [m.scale for m in run]
    return lowrank.packed_linears(lowrank.cast(x, dtype), a, bs, scales, weight, bias)


def packed_candidates(run: list, x: mx.array, weight: mx.array, bias, dtype: mx.Dtype) -> pathchoice.Candidates:
    """The run's outputs packed and by the shared path (and in eval each merged), on random arrays of this call's
    shapes, for `pathchoice`."""
    training = run[0].training
    key = ("packed", tuple(weight.shape), str(weight.dtype), bias is not None, tuple(x.shape), str(x.dtype))
    key += (tuple(m.lora_a.shape[1] for m in run), tuple(m.lora_b.shape[1] for m in run), training)

    def build():
        w = pathchoice.random_like(weight)
        b_stacked = None if bias is None else pathchoice.random_like(bias)
        widths, scales = [m.lora_b.shape[1] for m in run], [m.scale for m in run]
        cuts = list(itertools.accumulate(widths))
        weights = mx.split(w, cuts[:-1])
        biases = [None] * len(run) if b_stacked is None else mx.split(b_stacked, cuts[:-1])
        primals = [pathchoice.random_like(x)]
        primals += [pathchoice.random_like(m.lora_a) for m in run] + [pathchoice.random_like(m.lora_b) for m in run]
        n = len(run)

        def packed_path(x, *p):
            a = mx.concatenate(p[:n], axis=1).astype(dtype)
            return lowrank.packed_linears(lowrank.cast(x, dtype), a, list(p[n:]), scales, w, b_stacked)

        def shared_path(x, *p):
            x = lowrank.cast(x, dtype)
            z = shared_product(x, list(p[:n]), dtype)
            return [
                lowrank.separate_with_product(x, zi, (s * bi).astype(dtype), lowrank.DenseBase(wi, bias_i))
                for zi, bi, s, wi, bias_i in zip(z, p[n:], scales, weights, biases)
            ]

        paths = {
            "shared": pathchoice.step(shared_path, primals, training),
            "packed": pathchoice.step(packed_path, primals, training),
        }
        if not training:  # each layer merged on its own: in eval, the layers' other choice
            twins = [pathchoice.random_twin(m) for m in run]
            paths["merged"] = pathchoice.step(lambda x, *p: [t._merged(x) for t in twins], primals, training)
        return paths

    return pathchoice.Candidates(key, build)


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
