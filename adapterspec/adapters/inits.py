"""How an adapter starts (a rule's `init`): mlx-lm's default, PEFT's gaussian, and PiSSA / OLoRA, which move the
principal part of W into A and B and leave the base the residual; the trained factors read back from their saved
form (a plain delta on the original weights, rank doubled: `weights.saved_weights`)."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from ..language.validate import BASE_CHANGING_INITS
from .basemodules import dense_weight

# the factors A0, B0 an adapter started from (PiSSA / OLoRA); kept beside the parameters, never trained or saved
INITIAL = "initial_factors"


def principal_factors(weight: mx.array, r: int, scale: float, init: str) -> tuple[mx.array, mx.array]:
    """(A0 (in, r), B0 (r, out)) in mlx-lm's layout with scale·(A0·B0)ᵀ the part of W (out, in) the adapter takes:
    PiSSA the r principal singular directions (U_r S_r V_rᵀ), OLoRA the first r columns of W's QR (PEFT's)."""
    w = weight.astype(mx.float32)
    if init == "pissa":
        u, s, vt = mx.linalg.svd(w, stream=mx.cpu)
        root = mx.sqrt(s[:r] / scale)
        b0 = u[:, :r] * root  # (out, r)
        a0 = root[:, None] * vt[:r]  # (r, in)
    elif init == "olora":
        q, upper = mx.linalg.qr(w, stream=mx.cpu)
        b0, a0 = q[:, :r], upper[:r]
    else:
        raise ValueError(f"init={init} does not change the base")
    # row-major, as the saved factors load back: a transposed layout would survive every optimizer update and
    # make a resumed run sum its matmuls in another order
    return mx.contiguous(a0.T), mx.contiguous(b0.T)


def residual_linear(base: nn.Module, a0: mx.array, b0: mx.array, scale: float) -> nn.Linear:
    """A new frozen Linear holding W − scale·(A0·B0)ᵀ in W's dtype, with the base's bias (the base is left as it was)."""
    weight = dense_weight(base)
    residual = (weight.astype(mx.float32) - scale * (a0 @ b0).T).astype(weight.dtype)
    output_dims, input_dims = residual.shape
    linear = nn.Linear(input_dims, output_dims, bias="bias" in base)
    linear.weight = residual
    if "bias" in base:
        linear.bias = base.bias
    linear.freeze()
    return linear


def gaussian(adapter: nn.Module, r: int) -> None:
    """PEFT's `init_lora_weights="gaussian"`: the factor that starts random is drawn from N(0, 1/r²); the zero one stays."""
    for name in ("lora_a", "lora_b"):
        value = adapter[name]
        if mx.any(value != 0).item():
            setattr(adapter, name, mx.random.normal(value.shape) / r)


def start(entry, base: nn.Module, make: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """The adapter of a plan entry, built by `make(base)`, started as its rule's `init` says."""
    if entry.init in BASE_CHANGING_INITS:
        a0, b0 = principal_factors(dense_weight(base), entry.r, entry.scale, entry.init)
        adapter = make(residual_linear(base, a0, b0, entry.scale))
        adapter.lora_a, adapter.lora_b = a0, b0
        object.__setattr__(adapter, INITIAL, (a0, b0))
        return adapter
    adapter = make(base)
    if entry.init == "gaussian":
        gaussian(adapter, entry.r)
    return adapter


def trained_weights(plan, weights: dict) -> dict:
    """Saved weights back as the training model holds them: the first r columns of A and rows of B of each
    PiSSA / OLoRA entry (the rest is −A0·B0, which the model recomputes from the original weights)."""
    found = dict(weights)
    for entry in plan.entries:
        if entry.init in BASE_CHANGING_INITS and f"{entry.path}.lora_a" in found:
            a, b = found[f"{entry.path}.lora_a"], found[f"{entry.path}.lora_b"]
            if a.shape[-1] == 2 * entry.r:
                found[f"{entry.path}.lora_a"] = mx.contiguous(a[:, : entry.r])  # a strided view would train apart
                found[f"{entry.path}.lora_b"] = b[: entry.r]
    return found
