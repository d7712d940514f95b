"""What the adapters share: their common base class, and what they need to know about base modules."""

import mlx.core as mx
import mlx.nn as nn


def quantization(module: nn.Module) -> dict | None:
    """The base's quantization settings (group_size, bits, mode), or None for a dense base."""
    if "scales" not in module:
        return None
    return {"group_size": module.group_size, "bits": module.bits, "mode": getattr(module, "mode", "affine")}


def dense_weight(module: nn.Module, after: mx.array | None = None) -> mx.array:
    """The base weight, dequantized when the base is quantized; with `after`, dequantized once `after` is computed,
    by an operation of its own (a compiled function would otherwise share one dequantized copy among all the
    places that dequantize the same weight, and keep it alive from the first to the last)."""
    q = quantization(module)
    if q is None:
        return module.weight
    extra = {}
    if getattr(module, "global_scale", None) is not None:
        extra["global_scale"] = module.global_scale
    weight, scales = module.weight, module.scales
    if after is not None:
        weight, scales = mx.depends([weight, scales], [after])
    return mx.dequantize(weight, scales, module.get("biases"), **q, **extra)


def last_dim(module: nn.Module) -> int:
    """Logical (dequantized) size of the weight's last axis."""
    if quantization(module) is None:
        return module.weight.shape[-1]
    return module.scales.shape[-1] * module.group_size


def matmul_without_bias(linear: nn.Module, x: mx.array) -> mx.array:
    """x @ Wᵀ for a Linear or QuantizedLinear, leaving out its bias."""
    q = quantization(linear)
    if q is None:
        return x @ linear.weight.T
    return mx.quantized_matmul(x, linear.weight, linear.scales, linear.get("biases"), transpose=True, **q)


def low_rank_init(shape: tuple[int, ...], fan_in: int) -> mx.array:
    """LoRA's A: uniform in ±1/sqrt(fan_in), float32."""
    bound = 1 / fan_in**0.5
    return mx.random.uniform(low=-bound, high=bound, shape=shape)


class AdapterModule(nn.Module):
    """A base module (frozen unless told otherwise) at `base_name`, plus dropout and scale; `from_base`."""

    kind = ""
    base_name = "linear"

    @classmethod
    def from_base(
        cls, base: nn.Module, r: int = 8, scale: float = 20.0, dropout: float = 0.0, freeze_base: bool = True
    ):
        return cls(base, r=r, scale=scale, dropout=dropout, freeze_base=freeze_base)

    def __init__(self, base: nn.Module, scale: float, dropout: float, freeze_base: bool):
        super().__init__()
        if freeze_base:
            base.freeze()
        setattr(self, self.base_name, base)
        self.dropout = nn.Dropout(p=dropout)
        self.dropout_p = dropout
        self.scale = scale

    @property
    def weight(self) -> mx.array:
        """The base's weight, for model code that reads `module.weight` itself (gemma3n's altup
        coefficients); the adapter's own parameters are `lora_a`/`lora_b` (and `m`)."""
        return getattr(self, self.base_name).weight

    def __setattr__(self, key: str, value) -> None:
        # model code that writes `module.weight` (gemma3n clips its coefficients in place) writes the base's
        if key == "weight" and self.base_name in self:
            setattr(getattr(self, self.base_name), key, value)
            return
        super().__setattr__(key, value)
