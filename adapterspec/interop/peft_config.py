"""A PEFT LoRA `adapter_config.json`: reading it, and what of it a spec can and cannot say."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
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
    """The adapter_config.json of a PEFT adapter directory (or the file itself), checked to be a LoRA config."""
    path = Path(path)
    file = path / CONFIG_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path}: no {CONFIG_FILE}", help="pass a directory written by PEFT's save_pretrained")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{file}: not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise UserError(f"{file}: not a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UserError(
            f"{file}: a {peft_type} adapter; only PEFT LoRA (and DoRA) adapters can be imported",
            help="adapterspec adapters are LoRA/DoRA; other PEFT methods have no equivalent",
        )
    return config


def unsupported(config: dict) -> list[Finding]:
    """Everything in the config a spec cannot express (lossy) or that the user should know about (note)."""
    out: list[Finding] = []
    if config.get("bias", "none") != "none":
        out.append(lossy(f"bias='{config['bias']}' trains the base layers' biases; a spec cannot train biases alone"))
    if config.get("lora_bias"):
        out.append(lossy("lora_bias=true gives lora_B a bias; adapterspec's LoRA has none"))
    if config.get("target_parameters"):
        out.append(
            lossy(
                f"target_parameters {config['target_parameters']} adapts raw parameters (fused experts); "
                "only modules can be imported"
            )
        )
    if config.get("layer_replication"):
        out.append(lossy("layer_replication duplicates blocks of the base model; a spec cannot"))
    if config.get("trainable_token_indices"):
        out.append(lossy("trainable_token_indices trains single embedding rows; a spec cannot"))
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
            note("ensure_weight_tying=true: with tied embeddings MLX adapts the output head through the embedding")
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
