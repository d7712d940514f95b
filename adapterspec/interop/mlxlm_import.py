"""mlx-lm adapter configs (`adapter_config.json` or an `mlx_lm.lora` YAML file) → spec text.

With a model the spec's plan is checked against what mlx-lm's `linear_to_lora_layers` adapts on it
(every `keys` entry in each of the last `num_layers` blocks, and at the top level; without `keys`
every Linear, SwitchLinear and Embedding of those blocks); `fine_tune_type: full` trains the last
`num_layers` blocks whole.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..model.adapter_format import MAX_CONFIG_BYTES, read_config_json
from ..model.index import ModuleIndex
from ..model.mlxlm import mlx_lm_blocks, mlx_lm_settings, spec_from_mlx_lm
from ..model.names import type_name
from .findings import Finding, as_comments, lossy, note
from .spec_writer import Assignment, explicit_rules, require_lint_clean

CONFIG_FILE = "adapter_config.json"
# mlx-lm reads YAML floats such as 1e-5 as numbers, not strings.
YAML_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


def read_mlx_lm_config(path) -> dict:
    """An mlx-lm adapter directory's adapter_config.json, or an mlx_lm.lora YAML (or JSON) config file."""
    path = Path(path)
    file = path / CONFIG_FILE if path.is_dir() else path
    if not file.exists() and not file.is_symlink():
        raise UserError(
            f"{path}: no such file or adapter directory",
            help="pass an mlx-lm adapter directory, its adapter_config.json, or an mlx_lm.lora YAML file",
        )
    if file.suffix in (".yaml", ".yml"):
        config = _read_yaml(file)
    else:
        config = read_config_json(file)
    if not isinstance(config, dict):
        raise UserError(f"{file}: {type_name(config)}, not a mapping of settings")
    if "adapterspec" in config:
        raise UserError(
            f"{file} was written by adapterspec; its spec is inside",
            help="the spec text is under adapter_config.json's 'adapterspec' → 'spec'",
        )
    return config


def _read_yaml(file: Path):
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", YAML_FLOAT, list("-+0123456789."))
    text = _yaml_text(file)
    try:
        return yaml.load(text, Loader)
    except yaml.YAMLError as error:
        raise UserError(f"{file}: not valid YAML ({error})") from None
    except RecursionError:
        raise UserError(f"{file}: nested too deeply to be a config") from None


def _yaml_text(file: Path) -> str:
    try:
        mode = file.stat().st_mode
        if not stat.S_ISREG(mode):
            raise UserError(f"{file}: not a regular file", help="pass the YAML file itself")
        if file.stat().st_size > MAX_CONFIG_BYTES:
            raise UserError(f"{file}: {file.stat().st_size} bytes, too large for a config")
        return file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{file}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise UserError(f"{file}: cannot be read ({error.strerror or error})") from None


def settings(config: dict, where: str = CONFIG_FILE) -> tuple[str, int, dict, list[Finding]]:
    """(fine_tune_type, num_layers, lora_parameters) as mlx_lm.lora resolves them, defaults included, each
    checked (a UserError names the field)."""
    findings = []
    fine_tune_type, num_layers, parameters = mlx_lm_settings(config, where, defaults=True)
    if config.get("lora_parameters") is None and fine_tune_type != "full":
        findings.append(note("no lora_parameters: mlx-lm's defaults rank=8, scale=20.0, dropout=0.0"))
    return fine_tune_type, num_layers, parameters, findings


def mlx_lm_choice(
    fine_tune_type: str, num_layers: int, parameters: dict, index: ModuleIndex
) -> tuple[dict, list[Finding]]:
    """MLX path → Assignment of every module mlx-lm adapts (or unfreezes), simulated on the index."""
    blocks = mlx_lm_blocks(index)
    if not blocks:
        raise UserError("the model has no list of blocks named 'layers', which mlx-lm's LoRA training needs")
    length = len(blocks)
    chosen = blocks[length - min(max(num_layers, 0) or length, length) :]
    findings = []
    if num_layers > length:
        findings.append(
            note(
                f"num_layers={num_layers} but the model has {length} blocks: all are used "
                "(mlx_lm.lora refuses this when training)"
            )
        )
    if fine_tune_type == "full":
        return {block: Assignment("full") for block in chosen}, findings
    assignment = Assignment(
        fine_tune_type, int(parameters["rank"]), scale=float(parameters["scale"]), dropout=float(parameters["dropout"])
    )
    keys = parameters.get("keys")
    if keys is None:
        keys = {m.path[len(block) + 1 :] for block in blocks for m in index.descendants(block) if m.adaptable}
    out: dict[str, Assignment] = {}
    for key in keys:
        paths = [f"{block}.{key}" for block in chosen] + [key]
        for path in paths:
            if path not in index:
                continue
            if not index[path].adaptable:
                findings.append(
                    lossy(
                        f"key '{key}' names '{path}' ({index[path].cls}), which mlx-lm cannot convert "
                        '(it stops with "Can\'t convert layer")'
                    )
                )
                continue
            out[path] = assignment
    return out, findings


def translate(
    config: dict, index: Optional[ModuleIndex] = None, *, source: str = CONFIG_FILE, model: Optional[str] = None
) -> tuple[str, list[Finding]]:
    """Spec text for an mlx-lm config (one that `adapterspec lint` passes); with a model, its plan equals mlx-lm's
    adapters on that model."""
    text, findings = _translate(config, index, source, model)
    return require_lint_clean(text, source), findings


def _translate(
    config: dict, index: Optional[ModuleIndex], source: str, model: Optional[str]
) -> tuple[str, list[Finding]]:
    fine_tune_type, num_layers, parameters, findings = settings(config, source)
    head = [
        "adapterspec 1",
        f"# imported from the mlx-lm config {source} (fine_tune_type={fine_tune_type}, num_layers={num_layers})",
    ]
    if index is None:
        rules, more = _structural(fine_tune_type, num_layers, parameters)
        findings += more
        return "\n".join(head + as_comments(findings) + rules) + "\n", findings
    choice, more = mlx_lm_choice(fine_tune_type, num_layers, parameters, index)
    findings += more
    if not choice:
        raise UserError(
            "mlx-lm's config adapts no module of this model", help="check 'keys' against 'adapterspec tree MODEL'"
        )
    head.append(f"# checked against mlx-lm's choice of modules on {model or 'the model'}")
    if fine_tune_type != "full":
        text, notes = spec_from_mlx_lm(parameters, num_layers, fine_tune_type, index)
        findings += [note(n) for n in notes]
        rules = [line for line in text.splitlines() if line and not line.startswith("#")]
        if _same(rules, choice, index):
            return "\n".join(head + as_comments(findings) + rules) + "\n", findings
    defaults, rules = explicit_rules(choice, index)
    return "\n".join(head + as_comments(findings) + defaults + rules) + "\n", findings


def _structural(fine_tune_type: str, num_layers: int, parameters: dict) -> tuple[list[str], list[Finding]]:
    blocks = "layers[*]" if num_layers <= 0 else f"layers[-{num_layers}:]"
    if fine_tune_type == "full":
        return [f"{blocks}: full"], []
    transform = (
        f"{fine_tune_type}(r={int(parameters['rank'])}, scale={float(parameters['scale'])!r}, "
        f"dropout={float(parameters['dropout'])!r})"
    )
    keys = parameters.get("keys")
    if keys is None:
        return [f"{blocks}: {transform}"], []
    findings = [
        note(
            "translated without a model: every key is read as a path inside a block "
            "(pass --model to place top-level keys such as lm_head)"
        )
    ]
    return [f"{blocks}.{key}: {transform}" for key in sorted(keys)], findings


def _same(rules: list[str], choice: dict, index: ModuleIndex) -> bool:
    from ..language.lint import check_text
    from ..model.plan import make_plan

    spec, _ = check_text("\n".join(rules) + "\n")
    if spec is None:
        return False
    plan = make_plan(spec, index)
    if not plan.ok:
        return False
    got = {e.path: (e.r, e.scale, e.dropout) for e in plan.entries}
    want = {p: (a.r, a.scale, a.dropout) for p, a in choice.items()}
    return got == want
