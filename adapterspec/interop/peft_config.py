"""A PEFT LoRA `adapter_config.json`: reading it, and what of it a spec can and cannot say."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..language.validate import MAX_RANK
from ..model.adapter_format import read_config_json
from ..model.names import describe_char, is_count, name_problem, number_problem, shown, type_name
from .findings import Finding, lossy, note

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."

# Keys that change nothing about which modules get adapters or what the adapters compute.
HARMLESS_KEYS = frozenset(
    {
        "task_type",
        "peft_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "megatron_core",
        "runtime_config",
        "qalora_group_size",
        "init_lora_weights",
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "use_dora",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "modules_to_save",
        "fan_in_fan_out",
        "bias",
        "lora_bias",
        "loftq_config",
        "ensure_weight_tying",
    }
)
# Initialisations whose adapters only fit the base weights they were trained against.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "eva", "lora_ga", "orthogonal")


def read_peft_config(path) -> dict:
    """The adapter_config.json of a PEFT adapter directory (or the file itself), checked to be a LoRA config whose
    fields have the types PEFT gives them."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise UserError(f"{path}: no such directory", help="pass a directory written by PEFT's save_pretrained")
    file = path / CONFIG_FILE if path.is_dir() else path
    if not path.is_dir() and path.name != CONFIG_FILE:
        raise UserError(
            f"{path}: not a PEFT adapter directory", help="pass a directory written by PEFT's save_pretrained"
        )
    if not file.exists() and not file.is_symlink():
        raise UserError(f"{path}: no {CONFIG_FILE}", help="pass a directory written by PEFT's save_pretrained")
    config = read_config_json(file)
    if not isinstance(config, dict):
        raise UserError(f"{file}: {type_name(config)}, not a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str):
        raise UserError(f"{file}: peft_type is {type_name(peft_type)}, not a PEFT method's name", help=FIELD_HELP)
    if peft_type.upper() != "LORA":
        raise UserError(
            f"{file}: a {shown(peft_type)} adapter (peft_type); only PEFT LoRA (and DoRA) adapters can be imported",
            help="adapterspec adapters are LoRA/DoRA; other PEFT methods have no equivalent",
        )
    check_fields(config, file)
    return config


FIELD_HELP = "fix the field as PEFT writes it (see LoraConfig), or save the adapter again with PEFT"


def check_fields(config: dict, file: Path) -> None:
    """Refuse fields of the wrong type or value (a UserError names the field): `r: "8"`, `lora_alpha: NaN` or null, a
    target that is no module name or no regular expression, a boolean written as a string, and the combinations
    PEFT's LoraConfig refuses."""
    for key, check in FIELD_CHECKS.items():
        if key not in config or (config[key] is None and key not in NUMBER_FIELDS):
            continue
        problem = check(config[key])
        if problem:
            raise UserError(f"{file}: {key}{problem}", help=FIELD_HELP)
    problem = layers_problem(config)
    if problem:
        raise UserError(f"{file}: {problem}", help=LAYERS_HELP)


# PEFT computes with these (`r <= 0`, `lora_alpha / r`, `lora_dropout > 0`), so null is an error there too.
NUMBER_FIELDS = frozenset({"r", "lora_alpha", "lora_dropout"})
LAYERS_HELP = (
    "PEFT's LoraConfig refuses this combination too: name the target modules as a list to pick blocks, "
    "or leave layers_to_transform and layers_pattern out"
)


def layers_problem(config: dict) -> Optional[str]:
    """What PEFT's `LoraConfig.__post_init__` raises about `layers_to_transform` and `layers_pattern`, or None."""
    targets = config.get("target_modules")
    for key in ("layers_to_transform", "layers_pattern"):
        if isinstance(targets, str) and config.get(key) is not None:
            return f"`{key}` cannot be used when `target_modules` is a str ({shown(targets)})"
    if config.get("layers_pattern") and config.get("layers_to_transform") is None:
        return "`layers_pattern` is set, so `layers_to_transform` must be set too"
    return None


def _rank(value) -> Optional[str]:
    problem = number_problem(value, whole=True, positive=True)
    if problem is None and value > MAX_RANK:
        problem = f"is {value}, more than the largest rank {MAX_RANK}"
    return f" {problem}" if problem else None


def _number(value) -> Optional[str]:
    problem = number_problem(value)
    return f" {problem}" if problem else None


def _dropout(value) -> Optional[str]:
    problem = number_problem(value, below_one=True)
    return f" {problem}" if problem else None


def _flag(value) -> Optional[str]:
    return None if isinstance(value, bool) else f" is {type_name(value)}, not true or false"


def _word(value) -> Optional[str]:
    return None if isinstance(value, str) and value.isprintable() else f" is {shown(value)}, not a word"


def _regex(value: str) -> Optional[str]:
    if not value.isprintable():
        return f" is a regular expression with {describe_char(next(c for c in value if not c.isprintable()))}"
    try:
        re.compile(value)
    except (re.error, RecursionError, OverflowError) as error:
        return f" is not a valid regular expression ({error})"
    return None


def _names(value, *, regex: bool = True) -> Optional[str]:
    """A list of module names, or (where PEFT takes one) a regular expression."""
    if isinstance(value, str):
        return _regex(value) if regex else " is a string, not a list of module names"
    if not isinstance(value, list):
        return f" is {type_name(value)}, not a list of module names" + (" or a regular expression" if regex else "")
    for number, name in enumerate(value):
        problem = name_problem(name)
        if problem:
            return f"[{number}] {problem}"
    return None


def _layers(value) -> Optional[str]:
    values = [value] if is_count(value) else value
    if not isinstance(values, list):
        return f" is {type_name(value)}, not a block number or a list of them"
    for number, item in enumerate(values):
        if not is_count(item) or item < 0:
            return f"{'' if values is not value else f'[{number}]'} is {shown(item)}, not a block number (0 or more)"
    return None


def _layers_pattern(value) -> Optional[str]:
    for number, item in enumerate([value] if isinstance(value, str) else value if isinstance(value, list) else [None]):
        if not isinstance(item, str):
            return f" is {type_name(value)}, not a name or a list of names"
        problem = _regex(item)
        if problem:
            return (f"[{number}]" if isinstance(value, list) else "") + problem
    return None


def is_peft_init(value: str) -> bool:
    """Whether PEFT 0.21's `LoraLayer.update_layer` knows the initialisation `value` (it raises on any other)."""
    return (
        value.lower() in ("gaussian", "olora", "mica")
        or value in ("eva", "loftq", "orthogonal", "lora_ga", "pissa")
        or re.fullmatch(r"pissa_niter_\d+", value) is not None
        or value.startswith("corda")
    )


PEFT_INITS = (
    'true, false, "gaussian", "eva", "olora", "pissa", "pissa_niter_N", "corda", "loftq", "orthogonal", "mica", '
    '"lora_ga"'
)


def _init(value) -> Optional[str]:
    if isinstance(value, bool) or (isinstance(value, str) and is_peft_init(value)):
        return None
    return f" is {shown(value) if isinstance(value, str) else type_name(value)}, not one of PEFT's ({PEFT_INITS})"


def _pattern(check):
    def problem_of(value) -> Optional[str]:
        if not isinstance(value, dict):
            return f" is {type_name(value)}, not a mapping of module-name patterns to values"
        for key, item in value.items():
            key_problem = _regex(key)
            if key_problem:
                return f" has a key that{key_problem}"
            item_problem = check(item)
            if item_problem:
                return f" gives {shown(key)} a value that{item_problem}"
        return None

    return problem_of


FIELD_CHECKS = {
    "r": _rank,
    "lora_alpha": _number,
    "lora_dropout": _dropout,
    "use_rslora": _flag,
    "use_dora": _flag,
    "fan_in_fan_out": _flag,
    "target_modules": _names,
    "exclude_modules": _names,
    "modules_to_save": lambda value: _names(value, regex=False),
    "layers_to_transform": _layers,
    "layers_pattern": _layers_pattern,
    "rank_pattern": _pattern(_rank),
    "alpha_pattern": _pattern(_number),
    "bias": _word,
    "base_model_name_or_path": _word,
    "init_lora_weights": _init,
}


def bias_findings(config: dict, biased: Optional[list[str]]) -> list[Finding]:
    """`bias` other than "none" trains base biases: lossy unless the modules it trains (`biased`, as PEFT picks them for
    the config on the model; None without a model) have no bias, so that nothing is trained."""
    bias = config.get("bias", "none")
    if bias == "none":
        return []
    if biased is None:
        return [lossy(f"bias='{bias}' trains the base layers' biases; a spec cannot train biases alone")]
    if biased:
        return [lossy(f"bias='{bias}' trains the bias of '{biased[0]}'; a spec cannot train biases alone")]
    return [note(f"bias='{bias}': the modules it would train have no bias on this model, so it changes nothing")]


def unsupported(config: dict) -> list[Finding]:
    """Everything in the config a spec cannot express (lossy) or that the user should know about (note)."""
    out: list[Finding] = []
    if config.get("lora_bias"):
        out.append(lossy("lora_bias=true gives lora_B a bias; adapterspec's LoRA has none"))
    if config.get("layer_replication"):
        out.append(lossy("layer_replication duplicates blocks of the base model; a spec cannot"))
    if config.get("alora_invocation_tokens"):
        out.append(lossy("activated LoRA (alora_invocation_tokens) switches the adapter on by token; a spec cannot"))
    if config.get("use_qalora"):
        out.append(lossy("QALoRA (use_qalora) pools the adapter's input; adapterspec's LoRA does not"))
    if config.get("megatron_config"):
        out.append(note("megatron_config is ignored (it only describes how the adapter was sharded in training)"))
    if config.get("fan_in_fan_out"):
        out.append(
            note("fan_in_fan_out=true: the base weights are stored transposed (Conv1D); the LoRA factors are not")
        )
    if config.get("ensure_weight_tying"):
        out.append(
            note(
                "ensure_weight_tying=true: PEFT sends the tied output head through the embedding's adapter, as MLX does"
            )
        )
    init = str(config.get("init_lora_weights", True)).lower()
    if any(init.startswith(name) for name in BASE_CHANGING_INITS):
        out.append(
            note(
                f"init_lora_weights='{config['init_lora_weights']}' changes the base weights during training "
                "unless the adapter was converted when saved; use the base model the adapter was saved for"
            )
        )
    for key, value in config.items():
        if key in HARMLESS_KEYS or key in {
            "bias",
            "lora_bias",
            "target_parameters",
            "layer_replication",
            "trainable_token_indices",
            "alora_invocation_tokens",
            "use_qalora",
            "megatron_config",
        }:
            continue
        if value not in (None, False, {}, [], ""):
            out.append(lossy(f"'{key}' = {json.dumps(value)[:80]} is a PEFT option adapterspec does not know"))
    return out
