"""Training options: mlx-lm's names and defaults, merged from the command line and a YAML config."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError

OPTIMIZERS = ("adam", "adamw", "muon", "sgd", "adafactor")

# mlx-lm keys that choose adapters; the spec does that here.
SPEC_DECIDES = ("fine_tune_type", "num_layers", "lora_parameters")
# mlx-lm keys without a meaning for `adapterspec train` (it always trains; it never loads remote code).
NOT_USED = ("train", "trust_remote_code")
# mlx-lm's dataset keys, passed through to its dataset loader unchanged.
DATASET_KEYS = ("hf_dataset", "text_feature", "prompt_feature", "completion_feature", "chat_feature")


@dataclass
class TrainOptions:
    """Everything `adapterspec train` needs; names and defaults are mlx_lm.lora's where it has them."""

    model: Optional[str] = None
    spec: Optional[str] = None
    data: Optional[str] = None
    adapter_path: str = "adapters"
    optimizer: str = "adam"
    optimizer_config: dict = field(default_factory=dict)
    learning_rate: float = 1e-5
    lr_schedule: Optional[dict] = None
    batch_size: int = 4
    iters: int = 1000
    val_batches: int = 25
    steps_per_report: int = 10
    steps_per_eval: int = 200
    save_every: int = 100
    keep_checkpoints: int = 0
    max_seq_length: int = 2048
    grad_checkpoint: bool = False
    grad_accumulation_steps: int = 1
    clear_cache_threshold: int = 0
    memory_limit: int = 0
    mask_prompt: bool = False
    seed: int = 0
    resume: bool = False
    resume_adapter_file: Optional[str] = None
    force: bool = False
    test: bool = False
    test_batches: int = 500
    report_to: Optional[str] = None
    project_name: Optional[str] = None
    dataset: dict = field(default_factory=dict)

    @property
    def optimizer_settings(self) -> dict:
        """The keyword arguments of the chosen optimizer (mlx-lm's optimizer_config[name])."""
        return dict(self.optimizer_config.get(self.optimizer, {}) or {})

    def trajectory(self) -> dict:
        """The options that decide the weights after each step; a resumed run must keep them."""
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "grad_accumulation_steps": self.grad_accumulation_steps,
            "max_seq_length": self.max_seq_length,
            "mask_prompt": self.mask_prompt,
            "optimizer": self.optimizer,
            "optimizer_config": self.optimizer_settings,
            "learning_rate": self.learning_rate,
            "lr_schedule": self.lr_schedule,
        }


OPTION_NAMES = tuple(f.name for f in fields(TrainOptions))


def read_yaml_config(path: str | Path) -> dict:
    """A YAML config as mlx_lm.lora reads it (its loader: `1e-5` is a float)."""
    import yaml
    from mlx_lm.lora import yaml_loader

    try:
        with open(path, "r", encoding="utf-8") as f:
            config = yaml.load(f, yaml_loader)
    except FileNotFoundError:
        raise UserError(f"{path}: no such config file") from None
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"{path}: cannot read the YAML config: {error}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise UserError(f"{path}: the YAML config is not a mapping of option names to values")
    return config


def merge_options(given: dict[str, Any], config: dict[str, Any]) -> tuple[TrainOptions, list[str]]:
    """Options from the command line (`given`, None = not given) over the YAML config over the defaults.

    Returns the options and notes about config keys that are ignored.
    """
    notes = []
    values: dict[str, Any] = {}
    dataset = {}
    for key, value in config.items():
        if value is None:  # mlx_lm.lora reads a null as "the default"
            continue
        if key in SPEC_DECIDES:
            notes.append(f"config key '{key}' is ignored: the spec decides which modules get which adapters")
        elif key in NOT_USED or key == "config":
            continue
        elif key in DATASET_KEYS:
            dataset[key] = value
        elif key == "adapter_file":
            notes.append("config key 'adapter_file' is ignored: the adapters go to adapter_path (-o)")
        elif key in OPTION_NAMES and key != "dataset":
            values[key] = value
        else:
            raise UserError(
                f"unknown key '{key}' in the YAML config",
                help=f"known keys: {', '.join(sorted(OPTION_NAMES + DATASET_KEYS))}",
            )
    for key, value in given.items():
        if value is not None:
            values[key] = value
    options = TrainOptions(**values, dataset=dataset)
    check_options(options)
    return options, notes


# The on/off options a YAML config may set: a quoted 'no' would be a true string.
SWITCHES = ("mask_prompt", "grad_checkpoint", "test", "resume", "force")
SEED_MAX = 2**32 - 1  # numpy's seeds, which mlx-lm's trainer uses too
# option → (type, smallest, largest); None: no bound. A float range excludes its lower bound when it is 0.
NUMBERS: dict[str, tuple[type, Optional[float], Optional[float]]] = {
    "learning_rate": (float, 0.0, 10.0),
    "batch_size": (int, 1, None),
    "iters": (int, 0, None),
    "val_batches": (int, -1, None),
    "test_batches": (int, -1, None),
    "steps_per_report": (int, 1, None),
    "steps_per_eval": (int, 1, None),
    "save_every": (int, 1, None),
    "keep_checkpoints": (int, 0, None),
    "max_seq_length": (int, 2, None),  # one token in, the next one its target
    "grad_accumulation_steps": (int, 1, None),
    "clear_cache_threshold": (int, 0, None),
    "memory_limit": (int, 0, None),
    "seed": (int, 0, SEED_MAX),
}


def check_number(name: str, value: Any, kind: type, low: Optional[float], high: Optional[float]) -> None:
    """UserError naming the option when `value` is not a finite `kind` within [low, high]."""
    option = f"--{name.replace('_', '-')}"
    number_types = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, number_types) or not math.isfinite(value):
        raise UserError(f"{option} must be a finite {'whole number' if kind is int else 'number'}, got {value!r}")
    too_low = low is not None and (value <= low if kind is float and low == 0 else value < low)
    if too_low or (high is not None and value > high):
        shown = (lambda x: f"{x:,}") if kind is int else (lambda x: f"{x:g}")
        bound = f"above {low:g}" if kind is float and low == 0 else f"at least {shown(low)}" if low is not None else ""
        limit = f"at most {shown(high)}" if high is not None else ""
        raise UserError(f"{option} must be {' and '.join(b for b in (bound, limit) if b)}, got {value!r}")


def check_options(options: TrainOptions) -> None:
    """UserError for options that cannot work, before anything is loaded."""
    missing = [name for name in ("model", "spec", "data") if not getattr(options, name)]
    if missing and not (missing == ["data"] and options.dataset.get("hf_dataset")):
        raise UserError(
            f"missing {', '.join(missing)}",
            help="give MODEL and SPEC as arguments and --data DIR, or set them in the -c config",
        )
    if not isinstance(options.optimizer, str) or options.optimizer.lower() not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {options.optimizer!r}", help=f"choose one of {', '.join(OPTIMIZERS)}")
    options.optimizer = options.optimizer.lower()
    for name, (kind, low, high) in NUMBERS.items():
        check_number(name, getattr(options, name), kind, low, high)
    for name in SWITCHES:
        value = getattr(options, name)
        if not isinstance(value, bool):
            raise UserError(
                f"{name} must be true or false, got {value!r}",
                help="write it unquoted in the YAML config: true or false",
            )
    check_optimizer_config(options.optimizer_config)
    if options.lr_schedule is not None and not (
        isinstance(options.lr_schedule, dict) and "name" in options.lr_schedule and "arguments" in options.lr_schedule
    ):
        raise UserError(
            "lr_schedule needs 'name' and 'arguments' (as mlx_lm.lora's config)",
            help="e.g. {name: cosine_decay, arguments: [1e-5, 1000], warmup: 100}",
        )
    if options.resume and options.force:
        raise UserError(
            "--resume and --force contradict each other",
            help="--resume continues the run in the output directory; --force starts over",
        )


def check_optimizer_config(config: Any) -> None:
    """UserError unless optimizer_config maps optimizer names to settings whose values are what mlx's optimizers
    take: numbers, true/false, null, or lists of numbers (betas). A string reached the first update before."""
    example = "e.g. optimizer_config: {adamw: {weight_decay: 0.01, betas: [0.9, 0.999]}}"
    if not isinstance(config, dict):
        raise UserError("optimizer_config must map optimizer names to their settings", help=example)
    for name, settings in config.items():
        if settings is None:
            continue
        if not isinstance(settings, dict):
            raise UserError(f"optimizer_config.{name} must map setting names to values", help=example)
        for key, value in settings.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            if not all(_optimizer_value(v) for v in values):
                raise UserError(
                    f"optimizer_config.{name}.{key} is {value!r}: not a number",
                    help="optimizer settings are numbers, true or false, or lists of numbers; " + example,
                )


def _optimizer_value(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return True
    return isinstance(value, (int, float)) and math.isfinite(value)
