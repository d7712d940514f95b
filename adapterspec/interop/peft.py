"""PEFT adapter directories ↔ specs and adapterspec adapter directories: the import and export entry points."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..model.index import ModuleIndex
from .findings import Finding
from .fused_experts import router_paths
from .peft_config import CONFIG_FILE, PREFIX, WEIGHTS_FILE, read_peft_config
from .peft_import import PeftTranslation, translate
from .spec_writer import require_lint_clean

EXPERT_MODULE = re.compile(r"\.experts\.\d+\.")


@dataclass
class PeftImport:
    translation: PeftTranslation
    model_dir: Optional[Path]
    plan: object = None

    @property
    def text(self) -> str:
        return self.translation.text

    @property
    def findings(self) -> list[Finding]:
        return self.translation.findings


def resolve_base_model(model: Optional[str], config: dict) -> tuple[Optional[Path], Optional[str]]:
    """The model directory to resolve against: --model, else the config's base model when it is cached locally."""
    from ..model.files import resolve_model_path

    if model:
        return resolve_model_path(model), model
    base = config.get("base_model_name_or_path")
    if not base:
        return None, None
    try:
        return resolve_model_path(base), base
    except UserError:
        return None, None


def import_peft(
    path, model: Optional[str] = None, *, need_model: bool = False, layout: Optional[str] = None
) -> PeftImport:
    """Translate a PEFT adapter's config into spec text, against the model when one is given or cached."""
    config = read_peft_config(path)
    model_dir, model_name = resolve_base_model(model, config)
    if need_model and model_dir is None:
        raise UserError(
            "converting the weights needs the base model",
            help="pass --model MODEL (the mlx-lm model directory the adapter is for)",
        )
    index = ModuleIndex.from_model_dir(model_dir) if model_dir else None
    if index is not None:
        refuse_vlm(index, model_dir, "import")
    if index is not None:
        layout = layout or import_layout(config, path, model_dir, index)
    source = f"{peft_directory(path).name}/{CONFIG_FILE}"
    translation = translate(config, index, source=source, model=model_name, layout=layout)
    result = PeftImport(translation, model_dir)
    require_lint_clean(result.text, str(path))
    if index is not None:
        from ..language.lint import parse_spec
        from ..model.plan import make_plan

        result.plan = make_plan(parse_spec(result.text, "<imported spec>"), index)
    return result


def model_layout(model_dir: Path) -> str:
    """The PEFT layout of experts for the transformers version the model's config.json was written by."""
    from ..model.files import read_model_config
    from .fused_experts import layout_of_version

    return layout_of_version(str(read_model_config(model_dir).get("transformers_version") or ""))


def import_layout(config: dict, path, model_dir: Path, index: ModuleIndex) -> str:
    """How the adapter saw the experts: fused parameters when it targets parameters or (on a MoE model) saved no
    per-expert module; one module per expert when it saved such modules; else as the model's config.json says."""
    from ..model.safetensors import read_safetensors_header

    if config.get("target_parameters"):
        return "target-parameters"
    file = peft_directory(path) / WEIGHTS_FILE
    if any(info.family == "switch" for info in index) and file.is_file():
        keys = read_safetensors_header(file)
        routers = tuple(f"{PREFIX}{path}.lora_" for path in router_paths(index))
        # per-expert modules, or a router adapted as a module (transformers 5's router is no Linear)
        t4 = any(EXPERT_MODULE.search(key) or key.startswith(routers) for key in keys)
        return "per-expert" if t4 else "target-parameters"
    return model_layout(model_dir)


def peft_directory(path) -> Path:
    """The PEFT adapter directory of `path`: the directory itself, or the one holding its adapter_config.json."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def peft_weights_file(path) -> Path:
    path = peft_directory(path)
    file = path / WEIGHTS_FILE
    if file.is_file():
        return file
    if (path / "adapter_model.bin").is_file():
        raise UserError(
            f"{path} holds adapter_model.bin (a pickle), which adapterspec does not read",
            help="re-save the adapter with PEFT's save_pretrained(..., safe_serialization=True)",
        )
    raise UserError(f"{path}: no {WEIGHTS_FILE}")


def write_imported_adapters(result: PeftImport, peft_dir, dest, *, force: bool = False) -> Path:
    """Convert the PEFT weights for the imported spec's plan and write an adapterspec adapter directory."""
    import mlx.core as mx

    from ..model.adapter_format import ADAPTER_CONFIG, ADAPTER_DIR_FILES, ADAPTER_WEIGHTS, adapter_config
    from ..outputs import atomic_output_dir
    from .peft_weights import peft_to_adapters, read_peft_weights

    plan = result.plan
    peft_dir = peft_directory(peft_dir)
    tensors = read_peft_weights(peft_weights_file(peft_dir))
    choice = result.translation.choice
    weights = peft_to_adapters(
        tensors,
        plan,
        plan.index,
        choice.expert_factors if choice else {},
        choice.fused if choice else [],
        choice.tied_head if choice else None,
        choice.routers if choice else [],
    )
    mismatched = changed_base_copies(tensors, result.model_dir)
    if mismatched:
        raise UserError(
            f"the PEFT adapter carries its own copy of '{mismatched[0]}' that differs from the model's "
            "(a resized vocabulary or trained tokens)",
            help="import it with the model it was trained on",
        )
    with atomic_output_dir(dest, force=force, protect=[peft_dir, result.model_dir], produces=ADAPTER_DIR_FILES) as tmp:
        mx.save_safetensors(str(tmp / ADAPTER_WEIGHTS), weights, metadata={"format": "mlx"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(plan), indent=2) + "\n", encoding="utf-8")
    return Path(dest)


def changed_base_copies(tensors: dict, model_dir: Path) -> list[str]:
    """Base weights PEFT saved beside the adapter (embeddings) that differ from the model's own."""
    import mlx.core as mx

    from ..model.files import weight_files
    from ..model.safetensors import read_safetensors_header

    copies = {
        k[len(PREFIX) :] if k.startswith(PREFIX) else k: v
        for k, v in tensors.items()
        if k.endswith(".base_layer.weight")
    }
    changed = []
    for key, value in copies.items():
        name = key.replace(".base_layer.weight", ".weight")
        for file in weight_files(model_dir):
            if name in read_safetensors_header(file):
                own = mx.load(str(file))[name]
                if (
                    own.shape != value.shape
                    or not mx.allclose(own.astype(mx.float32), value.astype(mx.float32), rtol=1e-3, atol=1e-5).item()
                ):
                    changed.append(name)
                break
    return changed


def export_peft(
    model: str,
    adapters,
    dest,
    *,
    base_model: Optional[str] = None,
    force: bool = False,
    layout: Optional[str] = None,
) -> tuple[dict, list[Finding]]:
    """Write an adapterspec (or mlx-lm) adapter directory as a PEFT LoRA adapter for the Hugging Face model."""
    import mlx.core as mx

    from ..adapters.weights import read_weights
    from ..model.adapter_format import ADAPTER_WEIGHTS, check_weights_file, plan_of, read_adapter_config
    from ..model.files import resolve_model_path
    from ..outputs import atomic_output_dir
    from .fused_experts import layout_problem, router_paths
    from .peft_export import peft_config
    from .peft_weights import adapters_to_peft, check_adapter_tensors, fused_to_peft

    model_dir = resolve_model_path(model)
    index = ModuleIndex.from_model_dir(model_dir)
    refuse_vlm(index, model_dir, "export")
    plan, _ = plan_of(read_adapter_config(adapters), index, adapters)
    weights_file = check_weights_file(Path(adapters) / ADAPTER_WEIGHTS)
    weights = read_weights(weights_file)
    check_adapter_tensors(weights, plan, index, weights_file)
    layout = layout or model_layout(model_dir)
    fused_tensors, fused = {}, {}
    moe = {e.path for e in plan.entries if index[e.path].family == "switch"} | router_paths(index)
    if layout == "target-parameters" and any(e.path in moe for e in plan.entries):
        problem = layout_problem(index)
        if problem:
            raise UserError(
                f"the experts cannot be written for transformers 5: {problem}",
                help="export with --peft-layout per-expert (transformers 4's one module per expert)",
            )
        fused_tensors, fused = fused_to_peft(weights, plan, index)
    peft, findings = peft_config(plan, index, base_model or model, layout, fused)
    tensors = {**adapters_to_peft(weights, plan, index, layout), **fused_tensors}
    with atomic_output_dir(
        dest, force=force, protect=[adapters, model_dir], produces=(WEIGHTS_FILE, CONFIG_FILE)
    ) as tmp:
        mx.save_safetensors(str(tmp / WEIGHTS_FILE), tensors, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(peft, indent=2) + "\n", encoding="utf-8")
    return peft, findings


def refuse_vlm(index: ModuleIndex, model_dir, verb: str) -> None:
    """PEFT's names for a vision-language model are transformers' (`model.visual.blocks…`), not mlx-vlm's module
    paths, and no table between them exists here yet: refused rather than written under names PEFT would not find."""
    from ..model.vlm import is_vlm_index

    if is_vlm_index(index):
        raise UserError(
            f"{model_dir}: a vision-language model; adapterspec cannot {verb} PEFT adapters for it yet "
            "(transformers names its modules differently from mlx-vlm)",
            help="mlx-vlm loads adapterspec's adapter directories directly (see 'plan': mlx-vlm compatible)"
            if verb == "export"
            else "adapter directories written by mlx-vlm's trainer import with 'adapterspec import mlx-lm'",
        )
