"""ModuleIndex: every module path of a model with its class, family, dims, dtype and quantization."""

from __future__ import annotations

import bisect
import math
import os
import re
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator

from .blocks import guess_block_list, live_block_list, live_blocks
from .families import (
    ConfigHints,
    appended_block_lists,
    bare_weight_class,
    is_embedding_path,
    is_multi_linear,
    is_routed_expert,
    linear_subclass,
)
from .hf_moe import sanitized_tensors

FAMILIES = ("linear", "switch", "embedding", "container", "list", "leaf")
ADAPTABLE_FAMILIES = frozenset({"linear", "switch", "embedding"})

# class name (anywhere in a module's MRO) → family
KNOWN_CLASSES = {
    "Linear": "linear",
    "QuantizedLinear": "linear",
    "SwitchLinear": "switch",
    "QuantizedSwitchLinear": "switch",
    "Embedding": "embedding",
    "QuantizedEmbedding": "embedding",
}

# Class names given to modules read from safetensors headers whose real class the headers cannot tell.
CONTAINER_CLASS = "Container"
NORM_CLASS = "Norm"
LEAF_CLASS = "Leaf"
LIST_CLASS = "list"
GUESSED_CLASSES = frozenset({CONTAINER_CLASS, NORM_CLASS, LEAF_CLASS})

# Last path segments of 2-D weights that are embeddings rather than linear layers (as in mlx-lm's models).
EMBEDDING_NAMES = frozenset(
    {
        "embed_tokens", "embed_tokens_per_layer", "embed", "embed_in", "embedding", "embeddings",
        "word_embeddings", "token_embeddings", "tok_embeddings", "wte", "wpe", "embed_positions",
        "position_embeddings", "position_embedding", "position_embedding_table", "token_type_embeddings",
    }
)  # fmt: skip
HEAD_NAMES = frozenset({"lm_head", "embed_out"})
NORM_NAME = re.compile(r"norm|^ln(_|$)|_ln$|^ln_f$", re.IGNORECASE)
QUANTIZATION_PARAMS = frozenset({"scales", "biases", "global_scale"})
# Modes whose scales are uint8 each allow one (bits, group_size): mlx-lm infers them the same way.
SCALED_FLOAT_MODES = ((4, 16, "nvfp4"), (4, 32, "mxfp4"), (8, 32, "mxfp8"))
DEFAULT_AFFINE = {"group_size": 64, "bits": 4, "mode": "affine"}
GUESS_BLOCK_LIST: Any = object()  # ModuleIndex(block_list=…) default: found from the module tree


@dataclass(frozen=True)
class ModuleInfo:
    """One module of a model. Dims are logical (dequantized); `num_params` counts its own parameters."""

    path: str
    cls: str
    family: str
    input_dims: int | None = None
    output_dims: int | None = None
    num_experts: int | None = None
    bias: bool = False
    dtype: str | None = None
    bits: int | None = None
    group_size: int | None = None
    mode: str | None = None
    num_params: int = 0
    has_params: bool = False

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def parent(self) -> str:
        return self.path.rsplit(".", 1)[0] if "." in self.path else ""

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def adaptable(self) -> bool:
        return self.family in ADAPTABLE_FAMILIES


def natural_key(path: str) -> tuple:
    """Sort key of a dotted path: segment by segment, numbers by value (layers.2 before layers.10)."""
    return tuple((0, int(s), "") if s.isdigit() else (1, 0, s) for s in path.split("."))


class ModuleIndex:
    """Every module of a model by path (root excluded), in natural order."""

    def __init__(
        self,
        modules: Iterable[ModuleInfo],
        *,
        tied_embeddings: bool = False,
        model_type: str | None = None,
        source: str = "module",
        block_list: str | None = GUESS_BLOCK_LIST,
        blocks: tuple[str, ...] | None = None,
    ):
        keyed = sorted(((natural_key(m.path), m) for m in modules), key=lambda pair: pair[0])
        self.modules: dict[str, ModuleInfo] = {m.path: m for _, m in keyed}
        # the list mlx-lm's `model.layers` returns (`h`, `transformer.blocks`, …): what `layers` selects
        if block_list is GUESS_BLOCK_LIST or (block_list is not None and block_list not in self.modules):
            block_list = guess_block_list(self.modules.values())
        self.block_list: str | None = block_list
        self.tied_embeddings = tied_embeddings
        self.model_type = model_type
        self.source = source
        self._paths = list(self.modules)
        self._keys = [key for key, _ in keyed]
        self._children: dict[str, list[str]] = {}
        for path in self._paths:
            parent = path.rsplit(".", 1)[0] if "." in path else ""
            self._children.setdefault(parent, []).append(path)
        if blocks is None:
            lists = ((block_list,) if block_list else ()) + appended_block_lists(model_type)
            blocks = tuple(p for name in lists if name in self.modules for p in self._children.get(name, ()))
        # the blocks of mlx-lm's `model.layers`, in its order: what its `num_layers` counts from the end
        self.blocks: tuple[str, ...] = blocks

    def __getitem__(self, path: str) -> ModuleInfo:
        return self.modules[path]

    def __contains__(self, path: object) -> bool:
        return path in self.modules

    def __iter__(self) -> Iterator[ModuleInfo]:
        return iter(self.modules.values())

    def __len__(self) -> int:
        return len(self.modules)

    def __repr__(self) -> str:
        return f"ModuleIndex({len(self)} modules, model_type={self.model_type!r}, source={self.source!r})"

    def children(self, path: str = "") -> list[ModuleInfo]:
        """The direct children of `path` ("" for the root), in natural order."""
        return [self.modules[p] for p in self._children.get(path, ())]

    def list_length(self, path: str) -> int:
        """The number of elements of the list module at `path`."""
        info = self.modules[path]
        if info.family != "list":
            raise ValueError(f"{path} is a {info.cls}, not a list")
        indices = [int(c.rsplit(".", 1)[-1]) for c in self._children.get(path, ())]
        return max(indices) + 1 if indices else 0

    def descendants(self, path: str = "") -> list[ModuleInfo]:
        """Every module beneath `path` ("" for the whole model), in natural order, `path` excluded."""
        if not path:
            return list(self.modules.values())
        start = bisect.bisect_right(self._keys, natural_key(path))
        prefix = path + "."
        out = []
        for p in self._paths[start:]:
            if not p.startswith(prefix):
                break
            out.append(self.modules[p])
        return out

    def by_family(self, *families: str) -> list[ModuleInfo]:
        return [m for m in self.modules.values() if m.family in families]

    @property
    def total_params(self) -> int:
        """Logical parameter count of the model (quantized weights counted dequantized)."""
        return sum(m.num_params for m in self.modules.values())

    @classmethod
    def from_module(cls, model: Any, *, model_type: str | None = None) -> "ModuleIndex":
        """Index a live mlx `nn.Module` (imports mlx)."""
        named = _walk_modules(model)
        infos = infos_from_module(model, named)
        lists = {m.path for m in infos if m.family == "list"}
        paths_by_id = {id(m): p for p, (m, _) in named.items()}
        blocks = live_block_list(model, paths_by_id, lists)
        args = getattr(model, "args", None)
        model_type = model_type or getattr(model, "model_type", None) or getattr(args, "model_type", None)
        text_args = getattr(args, "text_config", None)
        flag = tie_flag(
            {"tie_word_embeddings": getattr(args, "tie_word_embeddings", None)},
            text_args if isinstance(text_args, dict) else vars(text_args) if hasattr(text_args, "__dict__") else None,
        )
        tied = _tied_embeddings(infos, flag)
        return cls(
            infos,
            tied_embeddings=tied,
            model_type=model_type,
            source="module",
            block_list=blocks or GUESS_BLOCK_LIST,
            blocks=live_blocks(model, paths_by_id),
        )

    @classmethod
    def from_model_dir(cls, path: str | os.PathLike) -> "ModuleIndex":
        """Index a model directory (or a cached Hugging Face repo id) from config.json and safetensors headers.

        Never imports mlx. A Hugging Face mixture of experts is seen as mlx-lm's sanitize stacks it (`hf_moe`).
        Modules without parameters (RoPE, activations) are invisible here, and
        classes the headers cannot tell are named Norm, Leaf or Container (see GUESSED_CLASSES).
        """
        from .config import check_config_against_weights
        from .files import CONFIG_FILE, read_model_config, read_model_weights, resolve_model_path

        path = resolve_model_path(path)
        config = read_model_config(path)
        stored = read_model_weights(path)
        sanitized = sanitized_tensors({name: t for name, (_, t) in stored.items()}, config, str(path))
        weights = {name: (stored[sanitized.source_of(name)][0], t) for name, t in sanitized.tensors.items()}
        infos = infos_from_tensors({name: (t.dtype_name, t.shape) for name, (_, t) in weights.items()}, config)
        check_config_against_weights(config, infos, weights, path / CONFIG_FILE, is_routed_expert)
        text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
        tied = _tied_embeddings(infos, tie_flag(config, text_config))
        return cls(infos, tied_embeddings=tied, model_type=config.get("model_type"), source="model_dir")


def tie_flag(config: dict | None, text_config: dict | None) -> bool | None:
    """The config's `tie_word_embeddings`: the top level's, else text_config's (a VL wrapper's), else None."""
    for part in (config, text_config):
        value = part.get("tie_word_embeddings") if isinstance(part, dict) else None
        if value is not None:
            return bool(value)
    return None


def _tied_embeddings(infos: list[ModuleInfo], flag: bool | None) -> bool:
    """The structure decides: an output head means untied, no head beside an embedding means the head *is*
    the embedding (mlx-lm's `as_linear`), whatever the flag says; the flag only when there is neither."""
    if any(m.family == "linear" and (m.name in HEAD_NAMES or m.path == "output") for m in infos):
        return False
    if any(m.family == "embedding" for m in infos):
        return True
    return bool(flag)


# ── from safetensors headers ────────────────────────────────────────────────

Tensor = tuple[str, tuple[int, ...]]  # (mlx dtype name, shape)


def infos_from_tensors(tensors: dict[str, Tensor], config: dict | None = None) -> list[ModuleInfo]:
    """ModuleInfos inferred from the weight names and shapes of an mlx-lm checkpoint."""
    owned: dict[str, dict[str, Tensor]] = {}
    for name, tensor in tensors.items():
        owner, param = _split_param(name)
        owned.setdefault(owner, {})[param] = tensor
    child_names: dict[str, set[str]] = {}
    for owner in owned:
        path = owner
        while path:
            parent, _, leaf = path.rpartition(".")
            siblings = child_names.setdefault(parent, set())
            if leaf in siblings:
                break
            siblings.add(leaf)
            path = parent
    quantization = _quantization_config(config or {})
    hints = ConfigHints.from_config(config)
    nodes = {f"{parent}.{c}" if parent else c for parent, names in child_names.items() for c in names}
    return [_info_from_tensors(p, owned.get(p, {}), child_names.get(p), quantization, hints) for p in nodes]


def _split_param(name: str) -> tuple[str, str]:
    """Owner module path and parameter name; arrays kept in a list attribute (`x.w.0`) belong to `x`."""
    parts = name.split(".")
    end = len(parts) - 1
    while end > 0 and parts[end].isdigit():
        end -= 1
    return ".".join(parts[:end]), ".".join(parts[end:])


def _info_from_tensors(
    path: str, own: dict[str, Tensor], children: set[str] | None, quantization: dict, hints: ConfigHints | None = None
) -> ModuleInfo:
    hints = hints or ConfigHints()
    if children:
        is_list = all(c.isdigit() for c in children)
        cls, family = (LIST_CLASS, "list") if is_list else (CONTAINER_CLASS, "container")
        return ModuleInfo(path, cls, family, **_own_param_fields(own))
    name = path.rsplit(".", 1)[-1]
    weight = own.get("weight")
    extras = set(own) - {"weight", "bias"} - QUANTIZATION_PARAMS
    if weight is None or extras or len(weight[1]) not in (2, 3):
        cls = NORM_CLASS if weight is not None and len(weight[1]) == 1 and NORM_NAME.search(name) else LEAF_CLASS
        return ModuleInfo(path, cls, "leaf", **_own_param_fields(own))
    bias = own.get("bias")
    if len(weight[1]) == 3 and ("conv" in name.lower() or (bias is not None and len(bias[1]) != 2)):
        return ModuleInfo(path, LEAF_CLASS, "leaf", **_own_param_fields(own))
    if is_multi_linear(path, len(weight[1]), hints):
        cls = "QuantizedMultiLinear" if "scales" in own else "MultiLinear"
        return ModuleInfo(path, cls, "leaf", **_own_param_fields(own))
    bare = bare_weight_class(path, weight[1], bias[1] if bias is not None else None, hints)
    if bare is not None:
        return ModuleInfo(path, bare, "leaf", **_own_param_fields(own))
    if "scales" in own:
        info = _quantized_info(path, name, own, quantization)
    else:
        is_embedding = is_embedding_path(path, EMBEDDING_NAMES)
        family = "switch" if len(weight[1]) == 3 else ("embedding" if is_embedding else "linear")
        cls = {"switch": "SwitchLinear", "embedding": "Embedding", "linear": "Linear"}[family]
        info = _weight_info(path, cls, family, own, weight[1], weight[0], None)
    subclass = linear_subclass(path, info.quantized, hints) if info.family == "linear" else None
    return replace(info, cls=subclass) if subclass else info


def _quantized_info(path: str, name: str, own: dict[str, Tensor], quantization: dict) -> ModuleInfo:
    packed, scales = own["weight"][1], own["scales"]
    bits, group_size, mode = _quant_params(path, packed[-1], scales, quantization)
    if len(packed) == 3:
        family, cls = "switch", "QuantizedSwitchLinear"
    elif is_embedding_path(path, EMBEDDING_NAMES):
        family, cls = "embedding", "QuantizedEmbedding"
    else:
        family, cls = "linear", "QuantizedLinear"
    shape = packed[:-1] + (packed[-1] * 32 // bits,)
    dtype = scales[0] if scales[0].startswith(("float", "bfloat")) else "bfloat16"
    return _weight_info(path, cls, family, own, shape, dtype, (bits, group_size, mode))


def _weight_info(
    path: str, cls: str, family: str, own: dict[str, Tensor], shape: tuple, dtype: str, quant: tuple | None
) -> ModuleInfo:
    """A linear, switch or embedding module from its logical weight shape."""
    if family == "embedding":
        input_dims, output_dims, experts = shape[0], shape[1], None
    else:
        input_dims, output_dims, experts = shape[-1], shape[-2], (shape[0] if family == "switch" else None)
    bias = own.get("bias")
    num_params = math.prod(shape) + (math.prod(bias[1]) if bias is not None else 0)
    bits, group_size, mode = quant or (None, None, None)
    return ModuleInfo(
        path, cls, family, input_dims, output_dims, experts, bias is not None, dtype,
        bits, group_size, mode, num_params, True,
    )  # fmt: skip


def _own_param_fields(own: dict[str, Tensor]) -> dict:
    if not own:
        return {}
    first = own["weight"] if "weight" in own else own[min(own)]
    return {"dtype": first[0], "num_params": sum(math.prod(s) for _, s in own.values()), "has_params": True}


def _quantization_config(config: dict) -> dict:
    q = config.get("quantization") or config.get("quantization_config") or {}
    return q if isinstance(q, dict) else {}


def _quant_params(path: str, packed_in: int, scales: Tensor, quantization: dict) -> tuple[int, int, str]:
    """(bits, group_size, mode) of a quantized weight: the per-module entry, else the default, checked against shapes."""
    n_groups = scales[1][-1]
    entry = quantization.get(path)
    params = entry if isinstance(entry, dict) else quantization
    mode = params.get("mode", "affine") if isinstance(params.get("mode"), str) else "affine"
    bits, group_size = params.get("bits"), params.get("group_size")
    if not scales[0].startswith(("float", "bfloat")):
        for b, g, m in SCALED_FLOAT_MODES:
            if packed_in * 32 == b * g * n_groups:
                return b, g, m
    if not isinstance(bits, int):
        group_size = group_size if isinstance(group_size, int) else DEFAULT_AFFINE["group_size"]
        bits = packed_in * 32 // (group_size * n_groups) or DEFAULT_AFFINE["bits"]
    group_size = packed_in * 32 // bits // n_groups
    return bits, group_size, mode


# ── from a live nn.Module ───────────────────────────────────────────────────


def infos_from_module(model: Any, named: dict | None = None) -> list[ModuleInfo]:
    """ModuleInfos of every module under `model`, plus the lists (and dicts) of modules between them."""
    named = _walk_modules(model) if named is None else named
    child_names: dict[str, set[str]] = {}
    intermediates = set()
    for path in named:
        while path:
            parent, _, leaf = path.rpartition(".")
            child_names.setdefault(parent, set()).add(leaf)
            if parent and parent not in named:
                intermediates.add(parent)
            path = parent
    infos = [_info_from_module(p, m, own, bool(child_names.get(p))) for p, (m, own) in named.items()]
    for path in intermediates:
        is_list = all(c.isdigit() for c in child_names[path])
        infos.append(ModuleInfo(path, LIST_CLASS if is_list else "dict", "list" if is_list else "container"))
    return infos


def _walk_modules(model: Any) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Path → (module, its own arrays) for every module below the root, in one pass over the tree.

    The paths are those of `named_modules()`; walking the module dicts directly is several times faster.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    array, module_type = mx.array, nn.Module
    found: dict[str, tuple[Any, dict[str, Any]]] = {}
    stack = [("", model)]
    while stack:
        path, module = stack.pop()
        own: dict[str, Any] = {}
        prefix = path + "." if path else ""
        for key, value in module.items():
            if key.startswith("_"):
                continue
            if isinstance(value, array):
                own[key] = value
            elif isinstance(value, module_type):
                stack.append((prefix + key, value))
            elif isinstance(value, (list, tuple, dict)):
                for name, leaf in tree_flatten(value, prefix="." + key, is_leaf=module_type.is_module):
                    if isinstance(leaf, module_type):
                        stack.append((prefix + name, leaf))
                    elif isinstance(leaf, array):
                        own[name] = leaf
        if path:
            found[path] = (module, own)
    return found


def _info_from_module(path: str, module: Any, own: dict[str, Any], has_children: bool) -> ModuleInfo:
    cls = type(module).__name__
    family = "container" if has_children else _known_family(module)
    weight = own.get("weight")
    if family in ("container", "leaf") or weight is None or weight.ndim != (3 if family == "switch" else 2):
        return ModuleInfo(path, cls, "container" if has_children else "leaf", **_own_array_fields(own))
    quant = None
    shape = tuple(weight.shape)
    dtype = _dtype_name(weight)
    if "scales" in own and isinstance(getattr(module, "bits", None), int):
        bits = module.bits
        quant = (bits, module.group_size, getattr(module, "mode", "affine"))
        shape = shape[:-1] + (shape[-1] * 32 // bits,)
        scales_dtype = _dtype_name(own["scales"])
        dtype = scales_dtype if scales_dtype.startswith(("float", "bfloat")) else "bfloat16"
    shapes = {k: (_dtype_name(v), tuple(v.shape)) for k, v in own.items()}
    return _weight_info(path, cls, family, shapes, shape, dtype, quant)


_FAMILY_BY_TYPE: dict[type, str] = {}
_DTYPE_NAMES: dict[Any, str] = {}


def _known_family(module: Any) -> str:
    kind = type(module)
    family = _FAMILY_BY_TYPE.get(kind)
    if family is None:
        family = next((KNOWN_CLASSES[k.__name__] for k in kind.__mro__ if k.__name__ in KNOWN_CLASSES), "leaf")
        _FAMILY_BY_TYPE[kind] = family
    return family


def _own_array_fields(own: dict[str, Any]) -> dict:
    return _own_param_fields({k: (_dtype_name(v), tuple(v.shape)) for k, v in own.items()})


def _dtype_name(array: Any) -> str:
    dtype = array.dtype
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).rsplit(".", 1)[-1]
    return name
