"""The adapter-directory format: `adapters.safetensors` + `adapter_config.json`, ours (spec and plan inside) or
mlx-lm's (`keys`/`num_layers`, translated to a spec); reading and writing the weights is `adapters.weights`."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Optional

from .. import __version__
from ..errors import UserError
from .index import ModuleIndex
from .kinds import KINDS
from .names import is_count, name_problem, number_problem, shown, type_name

if TYPE_CHECKING:
    from .plan import Plan

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# What an adapter directory holds: with --force, a directory holding only these is a previous output to replace.
ADAPTER_DIR_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)
FORMAT = 1
MAX_CONFIG_BYTES = 16 << 20
# per-rule settings that change how adapters train, not what they compute: no adapter config but ours carries them
TRAINING_ONLY = ("lr_scale", "loraplus", "weight_decay")
DAMAGED_HELP = "the adapter directory is damaged: write it again with 'adapterspec apply' or 'adapterspec train'"


def saved_plan(plan: Plan) -> Plan:
    """The plan an adapter directory stands for: an entry whose init changes the base (PiSSA, OLoRA) is saved as
    the plain LoRA of rank 2r on the original weights that it equals ([A, A0] and [B, −B0])."""
    from dataclasses import replace

    from ..language.validate import BASE_CHANGING_INITS

    if not any(e.init in BASE_CHANGING_INITS for e in plan.entries):
        return plan
    entries = [
        replace(e, r=2 * e.r, init="default", trainable=2 * e.trainable) if e.init in BASE_CHANGING_INITS else e
        for e in plan.entries
    ]
    return replace(plan, entries=entries)


def conversions(plan: Plan) -> list[dict]:
    """The entries `saved_plan` writes at twice their rank, with the init and rank they trained at."""
    from ..language.validate import BASE_CHANGING_INITS

    return [{"path": e.path, "init": e.init, "r": e.r} for e in plan.entries if e.init in BASE_CHANGING_INITS]


def adapter_config(plan: Plan, extra: Optional[dict] = None) -> dict:
    """The adapter_config.json of a plan: our section, plus mlx-lm's keys when the plan fits them (mlx-vlm's for a
    vision-language model)."""
    from .mlxlm import mlx_lm_config
    from .vlm import is_vlm_index, mlx_vlm_config

    converted = conversions(plan)
    plan = saved_plan(plan)
    fit = mlx_lm_config(plan, plan.index)
    plan_json = plan.to_json()
    plan_json.pop("diagnostics", None)
    ours = {
        "format": FORMAT,
        "version": __version__,
        "spec": plan.spec.source,
        "spec_file": Path(plan.spec.filename).name,
        "plan": plan_json,
        "mlx_lm_compatible": fit.compatible,
    }
    if not fit.compatible:
        ours["mlx_lm_incompatible_because"] = fit.reasons
    if converted:
        ours["converted_to_plain_lora"] = converted
    not_carried = sorted({key for e in plan.entries for key in e.training_json() if key in TRAINING_ONLY})
    if not_carried:
        ours["training_settings_not_in_mlx_lm_config"] = not_carried
    config: dict = {"adapterspec": ours}
    if fit.compatible:
        config.update(fit.config)
    elif is_vlm_index(plan.index):
        vlm_fit = mlx_vlm_config(plan)
        ours["mlx_vlm_compatible"] = vlm_fit.compatible
        if vlm_fit.compatible:
            config.update(vlm_fit.config)
        else:
            ours["mlx_vlm_incompatible_because"] = vlm_fit.reasons
    if extra:
        config.update(extra)
    return config


def read_config_json(file: Path) -> Any:
    """A small JSON file, or a UserError naming it: missing, not a regular file, too large, not UTF-8, not JSON,
    or nested too deeply to parse."""
    file = Path(file)
    try:
        mode = file.stat().st_mode
    except FileNotFoundError:
        raise UserError(f"{file}: no such file") from None
    except OSError as error:
        raise UserError(f"{file}: cannot be read ({error.strerror or error})") from None
    if not stat.S_ISREG(mode):
        what = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise UserError(f"{file}: {what}, not a JSON file", help="point at the JSON file itself")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"{file}: {file.stat().st_size} bytes, too large for a config (at most {MAX_CONFIG_BYTES})")
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise UserError(f"{file}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{file}: not valid JSON ({error})") from None
    except RecursionError:
        raise UserError(f"{file}: nested too deeply to be a config") from None
    except OSError as error:
        raise UserError(f"{file}: cannot be read ({error.strerror or error})") from None


def read_adapter_config(path) -> dict:
    """An adapter directory's adapter_config.json, checked: ours (spec and plan) or mlx-lm's settings."""
    directory = Path(path)
    if not directory.is_dir():
        what = "no such directory" if not directory.exists() else "not a directory"
        raise UserError(
            f"{path}: {what}", help="pass the directory written by 'adapterspec apply -o DIR' or by mlx_lm.lora"
        )
    config_path = directory / ADAPTER_CONFIG
    if not config_path.exists() and not config_path.is_symlink():
        raise UserError(
            f"{path} is not an adapter directory: {ADAPTER_CONFIG} is missing",
            help="pass the directory written by 'adapterspec apply -o DIR' or by mlx_lm.lora",
        )
    config = read_config_json(config_path)
    check_adapter_config(config, config_path)
    return config


def check_adapter_config(config: Any, file: Path) -> None:
    """Refuse an adapter config that is no mapping, has a damaged 'adapterspec' section, or bad mlx-lm settings."""
    from .mlxlm import mlx_lm_settings

    if not isinstance(config, dict):
        raise UserError(f"{file}: {type_name(config)}, not a JSON object", help=DAMAGED_HELP)
    if "adapterspec" in config:
        _check_ours(config["adapterspec"], file)
    else:
        mlx_lm_settings(config, str(file), defaults=False)


def _check_ours(ours: Any, file: Path) -> None:
    if not isinstance(ours, dict):
        _damaged(file, f"adapterspec is {type_name(ours)}, not a mapping")
    version = ours.get("format", FORMAT)
    if not is_count(version) or not 1 <= version <= FORMAT:
        raise UserError(
            f"{file}: adapterspec.format is {shown(version)}; this adapterspec reads format {FORMAT}",
            help="use the adapterspec version that wrote the directory, or write it again",
        )
    if not isinstance(ours.get("spec"), str):
        _damaged(file, f"adapterspec.spec is {type_name(ours.get('spec'))}, not the spec's text")
    if not isinstance(ours.get("spec_file", ""), str):
        _damaged(file, "adapterspec.spec_file is not a file name")
    if "plan" in ours:
        _check_plan(ours["plan"], file)


def _check_plan(plan: Any, file: Path) -> None:
    if not isinstance(plan, dict) or not isinstance(plan.get("modules"), list):
        what = (
            type_name(plan)
            if not isinstance(plan, dict)
            else f"a mapping whose modules are {type_name(plan.get('modules'))}"
        )
        _damaged(file, f"adapterspec.plan is {what}, not a plan with a list of modules")
    for number, module in enumerate(plan["modules"]):
        where = f"adapterspec.plan.modules[{number}]"
        if not isinstance(module, dict):
            _damaged(file, f"{where} is {type_name(module)}, not a mapping")
        problem = _module_problem(module)
        if problem:
            _damaged(file, f"{where}.{problem}")


def _module_problem(module: dict) -> Optional[str]:
    """What is wrong with one saved plan entry ('field is ...'), or None."""
    path_problem = name_problem(module.get("path"))
    if path_problem:
        return f"path {path_problem}"
    adapter = module.get("adapter")
    if adapter != "full" and adapter not in KINDS:
        return f"adapter is {shown(adapter)}, not an adapter kind ({', '.join(sorted(KINDS))} or full)"
    checks = {"r": {"whole": True, "positive": True}, "scale": {}, "dropout": {"below_one": True}}
    for key, wanted in checks.items():
        value = module.get(key)
        if value is None and (adapter == "full" or KINDS.get(adapter) and KINDS[adapter].transform == "tokens"):
            continue
        if value is None and key == "dropout":
            continue
        problem = number_problem(value, **wanted)
        if problem:
            return f"{key} {problem}"
    return None


def _damaged(file: Path, what: str) -> NoReturn:
    raise UserError(f"{file}: {what}", help=DAMAGED_HELP)


def spec_text_of(config: dict, index: ModuleIndex, file: str = ADAPTER_CONFIG) -> tuple[str, str, list[str]]:
    """The spec text an adapter config (checked by read_adapter_config) stands for, its file name, and notes on
    the translation."""
    from .mlxlm import mlx_lm_settings, spec_from_mlx_lm

    ours = config.get("adapterspec")
    if ours is not None:
        return ours["spec"], ours.get("spec_file", "<adapter_config.json>"), []
    fine_tune_type, num_layers, parameters = mlx_lm_settings(config, file, defaults=False)
    if fine_tune_type == "full":
        raise UserError(
            f"{file}: this adapter directory holds a full fine-tune (fine_tune_type: full), not adapters",
            help="load its weights with mlx-lm directly",
        )
    text, notes = spec_from_mlx_lm(parameters, num_layers, fine_tune_type, index)
    return text, "<mlx-lm adapter_config.json>", notes


def plan_of(config: dict, index: ModuleIndex, directory) -> tuple["Plan", list[str]]:
    """The plan an adapter directory's config stands for on this model, and notes on the translation; a saved
    plan that differs from it (another model, or a damaged config) is an error naming the config."""
    from ..language.diagnostics import SpecError
    from .plan import plan_spec

    file = Path(directory) / ADAPTER_CONFIG
    text, filename, notes = spec_text_of(config, index, str(file))
    try:
        plan = saved_plan(plan_spec(text, index, filename))
    except SpecError as error:
        raise UserError(
            f"{file}: the adapters were made for another model: their spec does not plan on it ({error})",
            help="use the adapters with the model they were trained for (the spec is under 'adapterspec' → 'spec')",
        ) from None
    saved = (config.get("adapterspec") or {}).get("plan")
    if saved is not None:
        expected = [(m["path"], m["adapter"], m["r"]) for m in saved["modules"]]
        actual = [(e.path, e.adapter, e.r) for e in plan.entries]
        if expected != actual:
            raise UserError(
                f"{file}: the adapters were made for another model (or the config was edited): "
                + _plan_difference(expected, actual),
                help="use the adapters with the model they were trained for",
            )
        _check_scales(saved["modules"], plan, file)
        _check_mlx_lm_keys(config, plan, index, file)
    return plan, notes


EDITED_HELP = (
    "to use these weights at other settings, write a new directory with a spec that gives them: "
    "'adapterspec apply MODEL SPEC --adapters DIR -o NEW' (every tool then reads one model from it)"
)


def _check_scales(saved_modules: list, plan: "Plan", file: Path) -> None:
    """The saved plan's scales are those of its spec: an edit to one of them would go unread."""
    for module, entry in zip(saved_modules, plan.entries):
        scale = module.get("scale")
        if scale is not None and entry.scale is not None and float(scale) != float(entry.scale):
            raise UserError(
                f"{file}: the saved plan gives '{entry.path}' scale {scale:g}, its spec {entry.scale:g} "
                "(the config was edited)",
                help=EDITED_HELP,
            )


def _check_mlx_lm_keys(config: dict, plan: "Plan", index: ModuleIndex, file: Path) -> None:
    """An adapterspec directory's mlx-lm (or mlx-vlm) keys say what its plan says, or mlx-lm (mlx-vlm) would load
    other adapters from it."""
    from .mlxlm import mlx_lm_config
    from .vlm import mlx_vlm_config

    ours = config.get("adapterspec") or {}
    if ours.get("mlx_lm_compatible"):
        fit = mlx_lm_config(plan, index)
    elif ours.get("mlx_vlm_compatible"):
        fit = mlx_vlm_config(plan)
    else:
        return
    if not fit.compatible:
        return
    written = json.loads(json.dumps(fit.config))
    for name, found, value in _pairs(written, config):
        if found != value:
            raise UserError(
                f"{file}: {name} is {found!r} but its adapterspec plan says {value!r}: mlx-lm would load other "
                "adapters from this directory than adapterspec does (the config was edited)",
                help=EDITED_HELP,
            )


def _pairs(written: dict, config: dict):
    """(name, value in the config, value written for the plan) for each key, one level into mappings."""
    for key, value in written.items():
        found = config.get(key)
        if isinstance(value, dict) and isinstance(found, dict):
            yield from ((f"{key}.{k}", found.get(k), v) for k, v in value.items())
        else:
            yield key, found, value


def saved_scales(directory: Path) -> dict[str, float]:
    """The scale each module's adapter was saved with in an adapter directory: from our saved plan, or mlx-lm's
    lora_parameters for every module (keyed by module path; empty where the directory does not say)."""
    config = read_adapter_config(directory)
    saved = (config.get("adapterspec") or {}).get("plan")
    if saved is not None:
        return {m["path"]: float(m["scale"]) for m in saved["modules"] if isinstance(m.get("scale"), (int, float))}
    scale = (config.get("lora_parameters") or {}).get("scale")
    return {"*": float(scale)} if isinstance(scale, (int, float)) and not isinstance(scale, bool) else {}


def _plan_difference(saved: list[tuple], planned: list[tuple]) -> str:
    """The first module on which a saved plan and the spec's plan on this model differ, in words."""
    missing = [entry for entry in saved if entry not in planned]
    if missing:
        path, kind, r = missing[0]
        return f"the saved plan adapts '{path}' ({kind}, r={r}), which its spec does not give it on this model"
    extra = [entry for entry in planned if entry not in saved]
    if extra:
        path, kind, r = extra[0]
        return f"on this model its spec adapts '{path}' ({kind}, r={r}), which the saved plan does not list"
    return "its spec plans the saved modules in another order"


def check_weights_file(file) -> Path:
    """An adapter directory's weights file, present and a regular file; else a UserError naming it."""
    file = Path(file)
    try:
        mode = file.stat().st_mode
    except FileNotFoundError:
        raise UserError(
            f"{file.parent}: {file.name} is missing",
            help="an adapter directory holds adapter_config.json and its weights",
        ) from None
    except OSError as error:
        raise UserError(f"{file}: cannot be read ({error.strerror or error})") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"{file}: not a regular file", help="an adapter directory's weights are one safetensors file")
    return file
