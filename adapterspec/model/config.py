"""config.json of a model directory checked: the fields adapterspec and mlx-lm rely on, and against the weights."""

from __future__ import annotations

import ast
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import UserError

# Integer fields that must be positive, with an upper bound far above any real model.
POSITIVE_INTS = {
    "hidden_size": 1 << 20,
    "num_attention_heads": 1 << 14,
    "num_key_value_heads": 1 << 14,
    "head_dim": 1 << 16,
    "intermediate_size": 1 << 22,
    "moe_intermediate_size": 1 << 22,
    "shared_expert_intermediate_size": 1 << 22,
    "vocab_size": 1 << 24,
    "num_hidden_layers": 1 << 12,
    "num_experts": 1 << 16,
    "num_local_experts": 1 << 16,
    "n_routed_experts": 1 << 16,
    "num_experts_per_tok": 1 << 16,
}
# Optional fields that Hugging Face configs often write as null (mlx-lm then uses its default).
NULLABLE = frozenset(
    {"head_dim", "num_key_value_heads", "moe_intermediate_size", "shared_expert_intermediate_size", "num_experts",
     "num_local_experts", "n_routed_experts", "num_experts_per_tok", "tie_word_embeddings"}
)  # fmt: skip
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")
BOOLEANS = ("tie_word_embeddings",)
MODEL_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
QUANT_BITS = frozenset({2, 3, 4, 5, 6, 8})
QUANT_GROUP_SIZES = frozenset({16, 32, 64, 128})
# mlx-lm architectures whose blocks are alike and whose attention and MLP have the standard shapes
# (q/k/v/o_proj of heads × head_dim, gate/up/down_proj of intermediate_size): checked tensor by tensor.
STANDARD_LAYOUT = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral"})
# mlx-lm architectures built of experts: their weights must hold some.
MOE_TYPES = frozenset({"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "granitemoe", "dbrx", "deepseek_v2"})
BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_FIX_CONFIG = "correct config.json, or convert the model again (mlx_lm.convert)"


def config_error(path: Path, what: str, help: str = _FIX_CONFIG) -> UserError:
    return UserError(f"{path}: {what}", help=help)


# ── the fields on their own ─────────────────────────────────────────────────


def check_model_config(config: Any, path: Path) -> dict:
    """config.json's value checked field by field (types, ranges, model_type); returned as is."""
    if not isinstance(config, dict):
        raise config_error(path, f"not a JSON object but {_json_kind(config)}")
    _check_model_type(config, path)
    _check_fields(config, path, "")
    text = config.get("text_config")
    if text is not None:
        if not isinstance(text, dict):
            raise config_error(path, f"'text_config' is {_json_kind(text)}, not an object")
        _check_fields(text, path, "text_config.")
    _check_quantization_fields(config, path)
    return config


def _check_fields(config: dict, path: Path, prefix: str) -> None:
    for name, limit in POSITIVE_INTS.items():
        if name in config and not (config[name] is None and name in NULLABLE):
            _positive_int(config[name], f"{prefix}{name}", limit, path)
    for name in BOOLEANS:
        if config.get(name) is not None and not isinstance(config[name], bool):
            raise config_error(path, f"'{prefix}{name}' is {_show(config[name])}, not true or false")
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads is not None and kv_heads is not None and heads % kv_heads:
        raise config_error(
            path, f"'{prefix}num_key_value_heads' ({kv_heads}) does not divide num_attention_heads ({heads})"
        )
    experts = next((config[name] for name in EXPERT_COUNTS if config.get(name) is not None), None)
    per_token = config.get("num_experts_per_tok")
    if experts is not None and per_token is not None and per_token > experts:
        raise config_error(path, f"'{prefix}num_experts_per_tok' ({per_token}) is more than the {experts} experts")


def _positive_int(value: Any, name: str, limit: int, path: Path) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise config_error(path, f"'{name}' is {_show(value)}, not an integer")
    if value <= 0 or value > limit:
        raise config_error(path, f"'{name}' is {value}, outside 1..{limit}")


def _check_model_type(config: dict, path: Path) -> None:
    model_type = config.get("model_type")
    if "model_type" not in config:
        raise config_error(path, "no 'model_type'", help='config.json must name the architecture (e.g. "llama")')
    if not isinstance(model_type, str) or not MODEL_TYPE.fullmatch(model_type):
        raise config_error(path, f"'model_type' is {_show(model_type)}, not an architecture name")
    problem = mlx_lm_model_problem(model_type)
    if problem and is_vlm_config(config):
        problem = mlx_vlm_model_problem(model_type)
    if problem:
        raise config_error(path, f"model_type '{model_type}': {problem}", help="check 'model_type', or upgrade mlx-lm")


# a module of mlx-lm that is an architecture: defines `Model`, or takes another's (solar_open's glm4_moe Model)
MODEL_DEFINITION = re.compile(r"^class Model\b|^from \.[\w.]+ import [^\n]*\bModel\b", re.MULTILINE)


def mlx_lm_model_problem(model_type: str) -> str | None:
    """Why the installed mlx-lm cannot build `model_type` (read from its files, nothing imported); None if it can,
    or when mlx-lm is not installed (the light install cannot tell)."""
    package = _package_dir("mlx_lm")
    if package is None:
        return None
    name = _remapping(package).get(model_type, model_type)
    source = mlx_lm_model_source(model_type)
    if source is None:
        return "mlx-lm has no such architecture"
    if not MODEL_DEFINITION.search(source):
        return f"mlx-lm's module '{name}' defines no Model: it is not an architecture"
    return None


def mlx_lm_model_source(model_type: str) -> str | None:
    """The source of the installed mlx-lm's module for `model_type` (read, not imported); None without one."""
    package = _package_dir("mlx_lm")
    if package is None or not MODEL_TYPE.fullmatch(model_type):
        return None
    module = package / "models" / f"{_remapping(package).get(model_type, model_type)}.py"
    return module.read_text(encoding="utf-8", errors="replace") if module.is_file() else None


def is_vlm_config(config: Any) -> bool:
    """config.json describes a vision-language model: it has a vision_config section, as mlx-vlm's do."""
    return isinstance(config, dict) and isinstance(config.get("vision_config"), dict)


def mlx_vlm_model_problem(model_type: str) -> str | None:
    """Why the installed mlx-vlm cannot build `model_type` (read from its files); None if it can, or when mlx-vlm
    is not installed."""
    package = _package_dir("mlx_vlm")
    if package is None:
        return None
    name = _remapping(package).get(model_type.lower(), model_type.lower())
    if not (package / "models" / name / "__init__.py").is_file():
        return "neither mlx-lm nor mlx-vlm has such an architecture"
    return None


def _package_dir(name: str) -> Path | None:
    """An installed package's directory, found on sys.path without importing anything (nor asking the import system)."""
    for entry in sys.path:
        candidate = Path(entry or ".") / name
        if (candidate / "__init__.py").is_file():
            return candidate
    return None


_REMAPPINGS: dict[Path, dict[str, str]] = {}


def _remapping(package: Path) -> dict[str, str]:
    """The package's MODEL_REMAPPING in utils.py (model types built by another module), read as a literal."""
    if package not in _REMAPPINGS:
        found: dict[str, str] = {}
        try:
            tree = ast.parse((package / "utils.py").read_text(encoding="utf-8"))
            for node in tree.body:
                if isinstance(node, ast.Assign) and any(
                    getattr(t, "id", None) == "MODEL_REMAPPING" for t in node.targets
                ):
                    value = ast.literal_eval(node.value)
                    found = {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}
        except (OSError, SyntaxError, ValueError):
            pass
        _REMAPPINGS[package] = found
    return _REMAPPINGS[package]


def _check_quantization_fields(config: dict, path: Path) -> None:
    key, quantization = quantization_section(config)
    if quantization is None or _foreign_quantization(key, quantization):
        return
    if not isinstance(quantization, dict):
        raise config_error(path, f"'{key}' is {_show(quantization)}, not an object with bits and group_size")
    _check_quant_params(quantization, key, path)
    for module, entry in quantization.items():
        if isinstance(entry, dict):
            _check_quant_params(entry, f"{key}.{module}", path)


def _check_quant_params(params: dict, where: str, path: Path) -> None:
    bits, group_size = params.get("bits"), params.get("group_size")
    if "bits" in params and (not _is_int(bits) or bits not in QUANT_BITS):
        raise config_error(path, f"'{where}.bits' is {_show(bits)}, not one of {sorted(QUANT_BITS)}")
    if "group_size" in params and (not _is_int(group_size) or group_size not in QUANT_GROUP_SIZES):
        raise config_error(path, f"'{where}.group_size' is {_show(group_size)}, not one of {sorted(QUANT_GROUP_SIZES)}")
    if "mode" in params and not isinstance(params["mode"], str):
        raise config_error(path, f"'{where}.mode' is {_show(params['mode'])}, not a string")


def quantization_section(config: dict) -> tuple[str, Any]:
    """('quantization' or 'quantization_config', its value) as mlx-lm reads it; the value None when there is none."""
    if config.get("quantization") is not None:
        return "quantization", config["quantization"]
    return "quantization_config", config.get("quantization_config")


def _foreign_quantization(key: str, quantization: Any) -> bool:
    """A Hugging Face quantization_config (GPTQ, AWQ, ...: it has a quant_method), which mlx-lm translates itself."""
    return key == "quantization_config" and isinstance(quantization, dict) and "quant_method" in quantization


# ── against the weights ─────────────────────────────────────────────────────


def check_config_against_weights(
    config: dict, modules: Iterable, weights: dict[str, tuple], path: Path, routed: Callable[[Any], bool]
) -> None:
    """The config's dimensions against the tensors (name → (file, TensorInfo)) and the modules inferred from them;
    `routed` tells a routed expert layer (what the config's expert count counts) from other modules."""
    infos = {m.path: m for m in sorted(modules, key=lambda m: m.path)}  # messages name the first in order
    blocks = _block_tensors(weights)
    _check_blocks(config, blocks, path)
    _check_quantized_weights(config, weights, path)
    _check_embeddings(config, infos, path)
    _check_experts(config, infos, path, routed)
    if config.get("model_type") in STANDARD_LAYOUT:
        if not config.get("mlp_only_layers") and config.get("decoder_sparse_step", 1) == 1:
            _check_uniform_blocks(blocks, weights)
        _check_projections(config, infos, weights, path)


def _block_tensors(weights: dict) -> dict[int, set[str]]:
    """Block number → the names of its tensors inside the block, for every tensor under model.layers."""
    per_block: dict[int, set[str]] = {}
    for name in weights:
        if name.startswith("model.layers."):
            match = BLOCK.match(name)
            if match:
                per_block.setdefault(int(match.group(1)), set()).add(match.group(2))
    return per_block


def _check_blocks(config: dict, per_block: dict[int, set[str]], path: Path) -> None:
    layers = config.get("num_hidden_layers")
    blocks = set(per_block)
    if layers is None or not blocks:
        return
    if blocks != set(range(layers)):
        raise config_error(
            path,
            f"'num_hidden_layers' is {layers} but the weights hold {len(blocks)} block(s) "
            f"(model.layers.{min(blocks)} to model.layers.{max(blocks)})",
        )


def _check_quantized_weights(config: dict, weights: dict, path: Path) -> None:
    key, quantization = quantization_section(config)
    if _foreign_quantization(key, quantization):
        return
    quantized = sorted(name[: -len(".scales")] for name in weights if name.endswith(".scales"))
    if quantized and quantization is None:
        raise config_error(
            path,
            f"the weights are quantized ('{quantized[0]}' has scales) but there is no 'quantization' section",
            help='add mlx-lm\'s quantization section ({"group_size": 64, "bits": 4}) or convert the model again',
        )
    if quantization is not None and not quantized:
        raise config_error(path, f"'{key}' says the model is quantized, but no weight has scales")
    for module in quantized:
        _check_packed(module, weights, quantization, key, path)
    for name, (file, info) in weights.items():
        owner = name[: -len(".weight")]
        if info.dtype == "U32" and name.endswith(".weight") and f"{owner}.scales" not in weights:
            raise UserError(
                f"{file}: '{name}' is packed (uint32) but '{owner}.scales' is missing",
                help="the file is damaged or incomplete; convert the model again",
            )


def _check_packed(module: str, weights: dict, quantization: dict, key: str, path: Path) -> None:
    """A quantized weight is uint32 and its packed width fits bits, group_size and the number of scale groups."""
    weight = weights.get(f"{module}.weight")
    file, scales = weights[f"{module}.scales"]
    if weight is None:
        raise UserError(f"{file}: '{module}.scales' has no '{module}.weight'", help="convert the model again")
    weight_file, info = weight
    if info.dtype != "U32":
        raise UserError(
            f"{weight_file}: '{module}.weight' is {info.dtype_name}, but a quantized weight ({module} has scales) "
            "is packed in uint32",
            help="the file is damaged or mixes two conversions; convert the model again",
        )
    entry = quantization.get(module)
    params = entry if isinstance(entry, dict) else quantization
    bits, group_size = params.get("bits"), params.get("group_size")
    if params.get("mode", "affine") != "affine" or not info.shape or not scales.shape:
        return
    if _is_int(bits) and _is_int(group_size) and info.shape[-1] * 32 != bits * group_size * scales.shape[-1]:
        raise config_error(
            path,
            f"'{key}' (bits {bits}, group_size {group_size}) does not fit '{module}': {info.shape[-1]} packed words "
            f"hold {info.shape[-1] * 32 // bits} values, {scales.shape[-1]} groups of {group_size} are "
            f"{scales.shape[-1] * group_size}",
        )


def _check_embeddings(config: dict, infos: dict, path: Path) -> None:
    embed = infos.get("model.embed_tokens")
    if embed is None or embed.family != "embedding":
        return
    vocab, hidden = config.get("vocab_size"), config.get("hidden_size")
    if vocab is not None and embed.input_dims != vocab:
        raise config_error(path, f"'vocab_size' is {vocab} but model.embed_tokens holds {embed.input_dims} rows")
    if hidden is not None and embed.output_dims != hidden:
        raise config_error(path, f"'hidden_size' is {hidden} but model.embed_tokens is {embed.output_dims} wide")


def _check_experts(config: dict, infos: dict, path: Path, routed: Callable[[Any], bool]) -> None:
    switches = [m for m in infos.values() if m.family == "switch" and routed(m)]
    expert_key = next((name for name in EXPERT_COUNTS if config.get(name) is not None), None)
    if config.get("model_type") in MOE_TYPES and not switches and not any(".experts." in p for p in infos):
        raise config_error(
            path,
            f"model_type '{config['model_type']}' is a mixture of experts, but the weights hold no experts",
            help="the model_type does not belong to these weights; correct it in config.json",
        )
    if expert_key is None:
        return
    for module in switches:
        if module.num_experts != config[expert_key]:
            raise config_error(
                path, f"'{expert_key}' is {config[expert_key]} but '{module.path}' holds {module.num_experts} experts"
            )


# A module's quantization tensors: a mixed-precision model (per-module entries in the config's quantization, as
# mlx-lm's mixed recipes and `fuse --keep-precision` write) has them in some blocks only.
QUANTIZATION_PARAMS = (".scales", ".biases", ".global_scale")


def _check_uniform_blocks(per_block: dict[int, set[str]], weights: dict) -> None:
    """Every block holds the same tensors (architectures whose blocks are alike), quantization tensors aside."""
    per_block = {b: {n for n in names if not n.endswith(QUANTIZATION_PARAMS)} for b, names in per_block.items()}
    common = set.union(*per_block.values()) if per_block else set()
    for block, names in sorted(per_block.items()):
        missing = sorted(common - names)
        if missing:
            others = [b for b, n in per_block.items() if missing[0] in n]
            file = next(iter(weights.values()))[0]
            raise UserError(
                f"{file.parent}: tensor 'model.layers.{block}.{missing[0]}' is missing "
                f"(block(s) {', '.join(map(str, others[:4]))} have it)",
                help="the weights are incomplete or damaged; convert or download the model again",
            )


def _check_projections(config: dict, infos: dict, weights: dict, path: Path) -> None:
    """Attention and MLP projections of every block against hidden_size, the heads and intermediate_size."""
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if hidden is None or heads is None:
        return
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    if not config.get("head_dim") and hidden % heads:
        raise config_error(path, f"'num_attention_heads' ({heads}) does not divide hidden_size ({hidden})")
    expected = {
        "self_attn.q_proj": (hidden, heads * head_dim),
        "self_attn.k_proj": (hidden, kv * head_dim),
        "self_attn.v_proj": (hidden, kv * head_dim),
        "self_attn.o_proj": (heads * head_dim, hidden),
    }
    inter = config.get("intermediate_size")
    if inter is not None:
        expected.update(
            {"mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter), "mlp.down_proj": (inter, hidden)}
        )
    for info in infos.values():
        match = BLOCK.match(info.path)
        dims = expected.get(match.group(2)) if match else None
        if dims and info.family == "linear" and (info.input_dims, info.output_dims) != dims:
            file, tensor = weights[f"{info.path}.weight"]
            raise config_error(
                path,
                f"'{info.path}' maps {info.input_dims} → {info.output_dims} (its weight in {file} is "
                f"{tensor.dtype_name} {list(tensor.shape)}), but hidden_size {hidden}, "
                f"num_attention_heads {heads}, num_key_value_heads {kv}, head_dim {head_dim}"
                + (f", intermediate_size {inter}" if inter is not None else "")
                + f" need {dims[0]} → {dims[1]}",
                help="config.json and the weights come from different models, or the weights are damaged",
            )


# ── words ───────────────────────────────────────────────────────────────────


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    text = repr(value) if not isinstance(value, (dict, list)) else _json_kind(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), "a number"
    )
