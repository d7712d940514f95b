"""Vision-language model directories (mlx-vlm's layout) read without mlx: the towers' modules, the block list,
selectors across towers, the model_type check against mlx-vlm, and the plans mlx-vlm's adapter config can say."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adapterspec.errors import UserError
from adapterspec.model.config import is_vlm_config
from adapterspec.model.files import read_model_config
from adapterspec.model.index import ModuleIndex
from adapterspec.model.plan import plan_spec
from adapterspec.model.vlm import is_vlm_dir, is_vlm_index, mlx_vlm_config

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "examples" / "models"
VLMS = ("tiny-qwen2-vl", "tiny-gemma3", "tiny-paligemma")
TOWERS_SPEC = (ROOT / "examples" / "specs" / "vlm-towers.aspec").read_text()
QWEN_SPEC = (ROOT / "examples" / "specs" / "vlm-qwen2-vl.aspec").read_text()


@pytest.mark.parametrize("name", VLMS)
def test_a_vlm_directory_is_indexed_with_both_towers(name):
    index = ModuleIndex.from_model_dir(MODELS / name)
    config = read_model_config(MODELS / name)
    assert is_vlm_config(config) and is_vlm_index(index) and is_vlm_dir(config, index)
    roots = {m.name for m in index.children("")}
    assert "language_model" in roots and "vision_tower" in roots
    # `layers` is the language model's block list, never the vision tower's
    assert index.block_list == "language_model.model.layers"
    assert index.list_length(index.block_list) == config.get(
        "num_hidden_layers", config.get("text_config", {}).get("num_hidden_layers")
    )
    vision_linears = [m for m in index.descendants("vision_tower") if m.family == "linear"]
    assert vision_linears, "the vision tower's linear layers are adaptable"


def test_siglip_position_embedding_is_an_embedding():
    index = ModuleIndex.from_model_dir(MODELS / "tiny-gemma3")
    info = index["vision_tower.vision_model.embeddings.position_embedding"]
    assert (info.family, info.input_dims, info.output_dims) == ("embedding", 16, 32)  # 4×4 patches, width 32


def test_text_models_are_not_vlms():
    index = ModuleIndex.from_model_dir(MODELS / "tiny-llama")
    assert not is_vlm_index(index) and not is_vlm_config(read_model_config(MODELS / "tiny-llama"))


@pytest.mark.parametrize("name", ("tiny-gemma3", "tiny-paligemma"))
def test_the_towers_spec_plans_each_tower_with_its_own_rank(name):
    index = ModuleIndex.from_model_dir(MODELS / name)
    plan = plan_spec(TOWERS_SPEC, index, "towers.aspec")
    by_path = {e.path: e for e in plan.entries}
    vision = [e for p, e in by_path.items() if p.startswith("vision_tower.")]
    language = [e for p, e in by_path.items() if p.startswith("language_model.")]
    assert {e.r for e in vision} == {4} and {e.path.rsplit(".", 1)[-1] for e in vision} == {
        "q_proj",
        "k_proj",
        "v_proj",
    }
    assert len(vision) == 3 * 2  # q, k, v in each of the two vision blocks
    assert {e.r for e in language} == {16}
    assert all(e.path.startswith("language_model.model.layers.1.") for e in language)
    assert any(e.adapter == "full" and e.path.startswith("multi_modal_projector") for e in plan.entries)
    fit = mlx_vlm_config(plan)
    assert not fit.compatible
    assert any("full" in r for r in fit.reasons) and any("rank" in r for r in fit.reasons)


def test_a_one_rank_plan_is_an_mlx_vlm_config_with_full_paths():
    index = ModuleIndex.from_model_dir(MODELS / "tiny-qwen2-vl")
    plan = plan_spec(QWEN_SPEC, index, "qwen.aspec")
    fit = mlx_vlm_config(plan)
    assert fit.compatible, fit.reasons
    params = fit.config["lora_parameters"]
    assert params["keys"] == [e.path for e in plan.entries]
    assert "vision_tower.blocks.0.attn.qkv" in params["keys"]
    assert (params["rank"], params["scale"], fit.config["fine_tune_type"]) == (8, 20.0, "lora")


def test_an_embedding_adapter_does_not_fit_mlx_vlm():
    index = ModuleIndex.from_model_dir(MODELS / "tiny-paligemma")
    plan = plan_spec("adapterspec 1\n\n/language_model.model.embed_tokens: lora(r=4)\n", index, "e.aspec")
    fit = mlx_vlm_config(plan)
    assert not fit.compatible and "linear layers only" in fit.reasons[0]


def _copy(name: str, tmp_path: Path, **config_changes) -> Path:
    target = tmp_path / name
    shutil.copytree(MODELS / name, target)
    config = json.loads((target / "config.json").read_text())
    config.update(config_changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.skipif(
    importlib.util.find_spec("mlx_vlm") is None, reason="mlx-vlm is not installed: the light install cannot tell"
)
def test_an_architecture_neither_mlx_lm_nor_mlx_vlm_has_is_refused(tmp_path):
    model = _copy("tiny-paligemma", tmp_path, model_type="no_such_vlm")
    with pytest.raises(UserError, match="neither mlx-lm nor mlx-vlm"):
        ModuleIndex.from_model_dir(model)


def test_an_mlx_vlm_architecture_is_accepted_without_importing_anything(tmp_path):
    """paligemma is mlx-vlm's alone: tree and plan read it, and neither mlx nor mlx-vlm is imported."""
    code = (
        "import sys\n"
        "from adapterspec.cli import main\n"
        f"rc = main(['plan', {str(MODELS / 'tiny-paligemma')!r}, {str(ROOT / 'examples/specs/vlm-towers.aspec')!r}])\n"
        "loaded = [m for m in ('mlx', 'mlx_vlm', 'mlx_lm') if m in sys.modules]\n"
        "print('LOADED', loaded)\n"
        "sys.exit(rc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout
    assert "mlx-vlm compatible: no" in result.stdout


@pytest.mark.parametrize(
    ("name", "vision_blocks"),
    [("tiny-qwen2-vl", "vision_tower.blocks"), ("tiny-paligemma", "vision_tower.vision_model.encoder.layers")],
)
def test_layers_means_each_towers_block_list(name, vision_blocks):
    """`layers` selects the vision tower's block list whatever its name, and the language model's; the roles
    resolve in both towers, and one selector reaching both is warned about (AS307)."""
    index = ModuleIndex.from_model_dir(MODELS / name)
    text = "adapterspec 1\n\n/vision_tower.**.layers[-1].**@attention: lora(r=4)\n"
    plan = plan_spec(text, index, "v.aspec")
    assert plan.entries and all(e.path.startswith(f"{vision_blocks}.1.") for e in plan.entries)
    both = plan_spec("adapterspec 1\n\nlayers[-1].**@attention: lora(r=4)\n", index, "b.aspec")
    roots = {e.path.split(".")[0] for e in both.entries}
    assert roots == {"language_model", "vision_tower"}
    assert any(e.path.startswith(f"{vision_blocks}.1.") for e in both.entries)
    assert any(e.path.startswith("language_model.model.layers.1.self_attn.") for e in both.entries)
    assert "AS307" in {d.code for d in both.diagnostics}


def test_tree_marks_the_vision_towers_block_list(capsys):
    from adapterspec.cli import main

    assert main(["tree", str(MODELS / "tiny-qwen2-vl")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("blocks  list[2]  (layers)" in line for line in lines)
