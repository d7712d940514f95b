"""mlx-lm's adapter config (`keys`, `num_layers`, `rank`, `scale`, `dropout`) ↔ specs and plans; pure Python."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from ..errors import UserError
from .config_fit import ConfigFit, one_setting_reasons
from .families import weight_read_by_model
from .index import ModuleIndex
from .kinds import DORA_KINDS, KINDS
from .names import name_problem, number_problem, shown, type_name
from .vlm import is_vlm_index

if TYPE_CHECKING:
    from .plan import Plan


FINE_TUNE_TYPES = ("lora", "dora", "full")
# mlx_lm.lora's CONFIG_DEFAULTS for the keys that decide the adapters.
MLX_LM_DEFAULTS = {
    "fine_tune_type": "lora",
    "num_layers": 16,
    "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0},
}
PARAMETER_CHECKS = {"rank": {"whole": True, "positive": True}, "scale": {}, "dropout": {"below_one": True}}
SETTINGS_HELP = "fix the field, or write the config again with mlx_lm.lora"


def block_list_path(index: ModuleIndex) -> Optional[str]:
    """The path of the list mlx-lm calls `model.layers` (`h` in gpt2, `transformer.blocks` in dbrx)."""
    blocks = getattr(index, "block_list", None)
    if blocks is not None and blocks in index:
        return blocks
    lists = [m.path for m in index if m.family == "list" and m.name == "layers"]
    return min(lists, key=lambda p: (p.count("."), p)) if lists else None


def mlx_lm_blocks(index: ModuleIndex) -> tuple[str, ...]:
    """The block paths of mlx-lm's `model.layers`, in its order (afm7 appends its kv-reuse blocks)."""
    blocks = getattr(index, "blocks", ())
    if blocks:
        return blocks
    path = block_list_path(index)
    return tuple(m.path for m in index.children(path)) if path else ()


def _enclosing_block(path: str, position: dict[str, int]) -> Optional[str]:
    """The block among `position`'s keys that holds `path` (None outside every block)."""
    parts = path.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in position:
            return prefix
    return None


def mlx_lm_config(plan: Plan, index: ModuleIndex) -> ConfigFit:
    """The mlx-lm `adapter_config.json` keys that make mlx-lm build exactly this plan's adapters."""
    entries = plan.entries
    if is_vlm_index(index):
        return ConfigFit(None, ["it is a vision-language model, which mlx-vlm loads (not mlx-lm)"])
    reasons = []
    if not entries:
        reasons.append("the plan adapts no module")
    kinds = {e.adapter for e in entries}
    if "full" in kinds:
        reasons.append("it trains some modules fully ('full'), which mlx-lm's lora/dora configs cannot say")
    if any(KINDS[k].transform == "tokens" for k in kinds - {"full"}):
        reasons.append("it trains token rows ('tokens'), which mlx-lm's configs cannot say")
    if {KINDS[k].transform for k in kinds - {"full"}} >= {"lora", "dora"}:
        reasons.append("it mixes lora and dora")
    switch_dora = next((e.path for e in entries if e.adapter == "switch-dora"), None)
    if switch_dora is not None:
        reasons.append(f"it puts DoRA on the experts of '{switch_dora}' (switch-dora), which mlx-lm does not have")
    reasons += one_setting_reasons(entries, "mlx-lm")
    types = {index.model_type} if index.model_type else set()
    reader = next((e for e in entries if weight_read_by_model(types, e.path)), None)
    if reader is not None:
        reasons.append(
            f"{weight_read_by_model(types, reader.path)}, and mlx-lm's adapter layers have no .weight "
            f"(adapterspec's do): mlx-lm's load_adapters would fail on '{reader.path}'"
        )
    if reasons:
        return ConfigFit(None, reasons)
    blocks = mlx_lm_blocks(index)
    position = {path: i for i, path in enumerate(blocks)}
    relative_keys: set[str] = set()
    positions: set[int] = set()
    top_keys: set[str] = set()
    for entry in entries:
        block = _enclosing_block(entry.path, position)
        if block is not None:
            positions.add(position[block])
            relative_keys.add(entry.path[len(block) + 1 :])
        else:
            top_keys.add(entry.path)
    num_layers = len(blocks) - min(positions) if positions else 0
    keys = relative_keys | top_keys
    wanted = {e.path for e in entries}
    produced = {
        f"{block}.{key}"
        for block in blocks[len(blocks) - num_layers :]
        for key in relative_keys
        if f"{block}.{key}" in index and index[f"{block}.{key}"].adaptable
    }
    produced |= {p for p in top_keys if p in index}
    if produced != wanted:
        missing = sorted(produced - wanted)
        reasons.append(
            "mlx-lm adapts the same keys in each of the last num_layers blocks, but this plan "
            f"leaves out e.g. '{missing[0]}'"
            if missing
            else "the adapted blocks are not the same in each block"
        )
        return ConfigFit(None, reasons)
    first = entries[0]
    config = {
        "fine_tune_type": "dora" if kinds & set(DORA_KINDS) else "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": first.r, "scale": first.scale, "dropout": first.dropout, "keys": sorted(keys)},
    }
    return ConfigFit(config, [])


def mlx_lm_settings(config: dict, where: str, *, defaults: bool) -> tuple[str, int, dict]:
    """(fine_tune_type, num_layers, lora_parameters) of an mlx-lm config, each checked; a UserError names the field.

    `defaults`: mlx_lm.lora's defaults fill what a training config leaves out (an adapter directory's
    config has num_layers and lora_parameters)."""
    fine_tune_type = config.get("fine_tune_type", MLX_LM_DEFAULTS["fine_tune_type"])
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise UserError(
            f"{where}: fine_tune_type {shown(fine_tune_type)} is not one mlx-lm trains",
            help=f"mlx-lm's fine_tune_type is one of {', '.join(FINE_TUNE_TYPES)}",
        )
    num_layers = _setting(config, "num_layers", where, defaults)
    problem = number_problem(num_layers, whole=True)
    if problem:
        raise UserError(f"{where}: num_layers {problem}", help="num_layers counts the last blocks to adapt")
    parameters = config.get("lora_parameters")
    if parameters is None and fine_tune_type == "full":
        return fine_tune_type, num_layers, {}
    parameters = _setting(config, "lora_parameters", where, defaults)
    if not isinstance(parameters, dict):
        raise UserError(f"{where}: lora_parameters is {type_name(parameters)}, not a mapping", help=SETTINGS_HELP)
    if fine_tune_type != "full":
        _check_parameters(parameters, where)
    return fine_tune_type, num_layers, parameters


def _setting(config: dict, key: str, where: str, defaults: bool):
    if key in config and config[key] is not None:
        return config[key]
    if defaults:
        return MLX_LM_DEFAULTS[key]
    raise UserError(f"{where}: mlx-lm's {key} is missing", help=SETTINGS_HELP)


def _check_parameters(parameters: dict, where: str) -> None:
    missing = [k for k in PARAMETER_CHECKS if k not in parameters]
    if missing:
        hint = " (mlx-lm's LoRA uses 'scale', not 'alpha')" if "alpha" in parameters and "scale" in missing else ""
        raise UserError(
            f"{where}: lora_parameters lacks {', '.join(missing)}{hint}; mlx-lm would stop with a KeyError",
            help="give rank, scale and dropout under lora_parameters",
        )
    for key, wanted in PARAMETER_CHECKS.items():
        problem = number_problem(parameters[key], **wanted)
        if problem:
            raise UserError(f"{where}: lora_parameters.{key} {problem}", help=SETTINGS_HELP)
    keys = parameters.get("keys")
    if keys is None:
        return
    if not isinstance(keys, list):
        raise UserError(
            f"{where}: lora_parameters.keys is {type_name(keys)}, not a list of module names",
            help='write keys as a list: ["self_attn.q_proj", "self_attn.v_proj"]',
        )
    for number, key in enumerate(keys):
        problem = name_problem(key)
        if problem:
            raise UserError(
                f"{where}: lora_parameters.keys[{number}] {problem}",
                help="each key is a module path inside a block, such as self_attn.q_proj",
            )


def _format_number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def _block_selectors(chosen: tuple[str, ...], index: ModuleIndex) -> list[str]:
    """Anchored selectors for these blocks: one per list they sit in (`/model.layers[-2:]`, `/model.h[*]`)."""
    by_list: dict[str, int] = {}
    for block in chosen:
        parent = block.rsplit(".", 1)[0]
        by_list[parent] = by_list.get(parent, 0) + 1
    selectors = []
    for parent, count in by_list.items():
        length = index.list_length(parent)
        selectors.append(f"/{parent}[-{count}:]" if count < length else f"/{parent}[*]")
    return selectors


def spec_from_mlx_lm(
    lora_parameters: dict, num_layers: int, fine_tune_type: str, index: ModuleIndex
) -> tuple[str, list[str]]:
    """A spec whose plan on this model equals what mlx-lm's `linear_to_lora_layers` builds; plus notes.

    Keys that match nothing are dropped with a note (mlx-lm ignores them silently).
    """
    if fine_tune_type not in ("lora", "dora"):
        raise UserError(f"fine_tune_type {shown(fine_tune_type)} has no adapter layers to translate")
    kind = fine_tune_type
    args = (
        f"r={int(lora_parameters.get('rank', 8))}, scale={_format_number(lora_parameters.get('scale', 20.0))}, "
        f"dropout={_format_number(lora_parameters.get('dropout', 0.0))}"
    )
    blocks = mlx_lm_blocks(index)
    count = num_layers if 0 < num_layers < len(blocks) else len(blocks)
    chosen = blocks[len(blocks) - count :]
    block_selectors = _block_selectors(chosen, index)
    notes: list[str] = []
    lines = [f"# translated from an mlx-lm adapter config (fine_tune_type={fine_tune_type}, num_layers={num_layers})"]
    keys = lora_parameters.get("keys")
    if kind == "dora":
        notes += _dora_on_experts_note(index, chosen, keys)
    if keys is None:
        lines += [f"{selector}: {kind}({args})" for selector in block_selectors]
        return "\n".join(lines) + "\n", notes
    for key in sorted(keys):
        in_blocks = any(f"{b}.{key}" in index and index[f"{b}.{key}"].adaptable for b in chosen)
        at_top = key in index and index[key].adaptable
        if in_blocks:
            lines += [f"{selector}.{key}: {kind}({args})" for selector in block_selectors]
        if at_top:
            lines.append(f"/{key}: {kind}({args})")
        if not in_blocks and not at_top:
            found = [index[p] for p in [key] + [f"{b}.{key}" for b in chosen] if p in index]
            if found:
                notes.append(
                    f"key '{key}' names a module that is no Linear, SwitchLinear or Embedding "
                    f"({found[0].cls}); mlx-lm fails on it, the translation leaves it out"
                )
            else:
                notes.append(f"key '{key}' matches no module of this model (mlx-lm ignores it)")
    if len(lines) == 1:  # a spec needs a rule: say "nothing" explicitly, as mlx-lm adapts nothing here
        lines += ["# no key names an adaptable module of this model", "/**: none"]
    return "\n".join(lines) + "\n", notes


def _dora_on_experts_note(index: ModuleIndex, chosen: tuple[str, ...], keys) -> list[str]:
    """mlx-lm refuses DoRA on a SwitchLinear; the translated spec gives those experts switch-DoRA."""
    paths = list(keys or ())
    for block in chosen:
        paths += [m.path for m in index.descendants(block)] if keys is None else [f"{block}.{k}" for k in keys]
    expert = next((index[p] for p in paths if p in index and index[p].family == "switch"), None)
    if expert is None:
        return []
    return [
        f"mlx-lm refuses DoRA on experts ('{expert.path}' is a {expert.cls}); the spec gives them switch-DoRA, "
        "which adapterspec trains, loads and fuses"
    ]
