"""Vision-language models through mlx-vlm: the live tree agrees with the directory's, adapters adapterspec saves are
loaded by mlx-vlm's own loader to the same outputs, and a fused directory is loaded and generates in mlx-vlm."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlx_vlm")
mx = pytest.importorskip("mlx.core")
import numpy as np
from mlx.utils import tree_flatten
from mlx_vlm import load as mlx_vlm_load
from mlx_vlm.prompt_utils import apply_chat_template
from mlx_vlm.utils import prepare_inputs
from PIL import Image

import adapterspec
from adapterspec.adapters.loading import load_model
from adapterspec.model.index import ModuleIndex

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "examples" / "models"
SPECS = ROOT / "examples" / "specs"
VLMS = ("tiny-qwen2-vl", "tiny-gemma3", "tiny-paligemma")
ONE_RANK = {
    "tiny-qwen2-vl": (SPECS / "vlm-qwen2-vl.aspec").read_text(),
    "tiny-paligemma": "adapterspec 1\n\n/language_model.model.layers[*].self_attn.<q,v>_proj: lora(r=8)\n"
    "/vision_tower.**.<q,k,v>_proj: lora(r=8)\n/multi_modal_projector.linear: lora(r=8)\n",
}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adapterspec.cli", *args], capture_output=True, text=True, timeout=300)


def _image() -> Image.Image:
    pixels = (np.random.RandomState(0).rand(56, 56, 3) * 255).astype("uint8")
    return Image.fromarray(pixels)


def _inputs(model, processor) -> dict:
    prompt = apply_chat_template(processor, model.config, "describe the image", num_images=1)
    token = getattr(model.config, "image_token_index", None) or getattr(model.config, "image_token_id", None)
    return prepare_inputs(processor, images=[_image()], prompts=[prompt], image_token_index=token)


def _logits(model, inputs: dict) -> np.ndarray:
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
    out = model(inputs["input_ids"], inputs["pixel_values"], mask=inputs["attention_mask"], **extra)
    return np.array(out.logits)


@pytest.mark.parametrize("name", VLMS)
def test_the_live_tree_agrees_with_the_directory(name):
    disk = ModuleIndex.from_model_dir(MODELS / name)
    model, _ = load_model(MODELS / name)
    live = ModuleIndex.from_module(model)
    for info in disk:
        if info.family in ("linear", "embedding", "list"):
            other = live[info.path]
            assert (other.family, other.input_dims, other.output_dims) == (
                info.family,
                info.input_dims,
                info.output_dims,
            )
    assert live.block_list == disk.block_list == "language_model.model.layers"
    assert live.tied_embeddings == disk.tied_embeddings


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """name → an adapter directory saved by adapterspec with random (non-zero) adapter weights, and its model."""
    out = {}
    for name, text in ONE_RANK.items():
        model, _ = load_model(MODELS / name)
        plan = adapterspec.apply(model, adapterspec.parse_spec(text))
        mx.random.seed(1)
        weights = [(k, mx.random.normal(v.shape) * 0.005) for k, v in tree_flatten(model.trainable_parameters())]
        model.load_weights(weights, strict=False)
        model.eval()
        directory = tmp_path_factory.mktemp(name) / "adapters"
        adapterspec.save_adapters(model, plan, directory)
        out[name] = (directory, model, plan)
    return out


@pytest.mark.parametrize("name", tuple(ONE_RANK))
def test_mlx_vlm_loads_the_adapters_to_the_same_outputs(name, trained):
    directory, model, plan = trained[name]
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["adapterspec"]["mlx_vlm_compatible"] is True
    assert config["lora_parameters"]["keys"] == [e.path for e in plan.entries]
    assert any(k.startswith("vision_tower.") for k in config["lora_parameters"]["keys"])
    base, processor = mlx_vlm_load(str(MODELS / name))
    theirs, _ = mlx_vlm_load(str(MODELS / name), adapter_path=str(directory))
    inputs = _inputs(base, processor)
    ours = _logits(model, inputs)
    assert np.abs(ours - _logits(base, inputs)).max() > 1e-3  # the adapters change the output
    np.testing.assert_allclose(_logits(theirs, inputs), ours, atol=1e-4)


@pytest.mark.parametrize("name", tuple(ONE_RANK))
def test_the_fused_directory_loads_and_generates_in_mlx_vlm(name, trained, tmp_path):
    from mlx_vlm import generate

    directory, model, _ = trained[name]
    result = _cli("fuse", str(MODELS / name), str(directory), "-o", str(tmp_path / "fused"))
    assert result.returncode == 0, result.stderr
    fused, processor = mlx_vlm_load(str(tmp_path / "fused"))
    inputs = _inputs(fused, processor)
    np.testing.assert_allclose(_logits(fused, inputs), _logits(model, inputs), atol=1e-4)
    prompt = apply_chat_template(processor, fused.config, "describe the image", num_images=1)
    out = generate(fused, processor, prompt, image=[_image()], max_tokens=4, verbose=False)
    assert out.generation_tokens > 0


def test_apply_writes_mlx_vlm_keys_and_plan_says_why_not_when_they_do_not_fit(tmp_path):
    spec = SPECS / "vlm-towers.aspec"
    result = _cli("apply", str(MODELS / "tiny-gemma3"), str(spec), "-o", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["adapterspec"]["mlx_vlm_compatible"] is False
    assert "lora_parameters" not in config
    assert config["adapterspec"]["mlx_lm_compatible"] is False
    plan = _cli("plan", str(MODELS / "tiny-gemma3"), str(spec))
    assert "mlx-vlm compatible: no — it trains some modules fully" in plan.stdout
    fresh, _ = load_model(MODELS / "tiny-gemma3")
    loaded = adapterspec.load_adapters(fresh, tmp_path / "a")
    assert len(loaded.entries) == 15


def test_without_mlx_vlm_a_vlm_directory_names_the_extra(tmp_path):
    code = (
        "import sys\nsys.modules['mlx_vlm'] = None\n"
        "from adapterspec.cli import main\n"
        f"sys.exit(main(['apply', {str(MODELS / 'tiny-paligemma')!r}, {str(SPECS / 'vlm-towers.aspec')!r}, "
        f"'-o', {str(tmp_path / 'out')!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "vision-language model, which needs mlx-vlm" in result.stderr
    assert "adapterspec[vlm]" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", VLMS)
def test_example_vlms_are_what_their_script_writes(name, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("adapterspec_example_vlms", MODELS / "make_vlms.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    written = script.make_vlm(script.EXAMPLE_VLMS[name], tmp_path / name)
    shipped = MODELS / name
    assert sorted(p.name for p in written.iterdir()) == sorted(p.name for p in shipped.iterdir())
    for file in shipped.iterdir():
        if file.suffix != ".safetensors":
            assert (written / file.name).read_bytes() == file.read_bytes(), file.name
    ours, theirs = mx.load(str(written / "model.safetensors")), mx.load(str(shipped / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(mx.array_equal(ours[k], theirs[k]).item() for k in ours)


def test_a_vlm_quantized_by_mlx_vlm_trains_loads_in_mlx_vlm_and_fuses(tmp_path):
    """mlx_vlm.convert -q quantizes the language model and leaves the vision tower dense; adapters on both
    (QLoRA on the language model) load in mlx-vlm to adapterspec's outputs, and the fused model generates."""
    import contextlib
    import io

    from mlx_vlm import convert, generate

    quantized = tmp_path / "q4"
    with contextlib.redirect_stdout(io.StringIO()):
        convert(str(MODELS / "tiny-qwen2-vl"), str(quantized), quantize=True, q_group_size=32, q_bits=4)
    index = ModuleIndex.from_model_dir(quantized)
    assert index["language_model.model.layers.0.self_attn.q_proj"].bits == 4
    assert index["vision_tower.blocks.0.attn.qkv"].bits is None
    model, _ = load_model(quantized)
    plan = adapterspec.apply(model, adapterspec.parse_spec(ONE_RANK["tiny-qwen2-vl"]))
    mx.random.seed(1)
    model.load_weights(
        [(k, mx.random.normal(v.shape) * 0.005) for k, v in tree_flatten(model.trainable_parameters())], strict=False
    )
    model.eval()
    adapterspec.save_adapters(model, plan, tmp_path / "adapters")
    theirs, processor = mlx_vlm_load(str(quantized), adapter_path=str(tmp_path / "adapters"))
    inputs = _inputs(theirs, processor)
    np.testing.assert_allclose(_logits(theirs, inputs), _logits(model, inputs), atol=1e-4)
    result = _cli("fuse", str(quantized), str(tmp_path / "adapters"), "-o", str(tmp_path / "fused"))
    assert result.returncode == 0, result.stderr
    fused, processor = mlx_vlm_load(str(tmp_path / "fused"))
    assert ModuleIndex.from_model_dir(tmp_path / "fused")["language_model.model.layers.0.self_attn.q_proj"].bits == 4
    prompt = apply_chat_template(processor, fused.config, "describe the image", num_images=1)
    assert generate(fused, processor, prompt, image=[_image()], max_tokens=4, verbose=False).generation_tokens > 0


def test_gemma3_adapters_load_and_fuse_in_mlx_vlm(tmp_path):
    """Gemma-3-like: mlx-vlm loads the adapters (language model and vision tower) to adapterspec's outputs on a
    text prompt, and the fused directory gives them too and generates with an image. (Its image prompts are
    not compared: mlx-vlm 0.7.10's Gemma 3 gives different logits from one model object to the next there.)"""
    from mlx_vlm import generate

    name = "tiny-gemma3"
    text = "adapterspec 1\n\n/language_model.model.layers[*].**@linear: lora(r=8)\n/vision_tower.**.layers[*].**@attention: lora(r=8)\n"
    model, _ = load_model(MODELS / name)
    plan = adapterspec.apply(model, adapterspec.parse_spec(text))
    assert any(e.path.startswith("vision_tower.") for e in plan.entries)
    mx.random.seed(1)
    model.load_weights(
        [(k, mx.random.normal(v.shape) * 0.005) for k, v in tree_flatten(model.trainable_parameters())], strict=False
    )
    model.eval()
    adapterspec.save_adapters(model, plan, tmp_path / "adapters")
    ids = mx.array([[5, 17, 40, 99, 7, 3, 250]])
    ours = np.array(model.language_model(ids).logits)
    theirs, _ = mlx_vlm_load(str(MODELS / name), adapter_path=str(tmp_path / "adapters"))
    base, _ = mlx_vlm_load(str(MODELS / name))
    assert np.abs(np.array(base.language_model(ids).logits) - ours).max() > 1e-3
    np.testing.assert_allclose(np.array(theirs.language_model(ids).logits), ours, atol=1e-4)
    result = _cli("fuse", str(MODELS / name), str(tmp_path / "adapters"), "-o", str(tmp_path / "fused"))
    assert result.returncode == 0, result.stderr
    fused, processor = mlx_vlm_load(str(tmp_path / "fused"))
    np.testing.assert_allclose(np.array(fused.language_model(ids).logits), ours, atol=1e-4)
    prompt = apply_chat_template(processor, fused.config, "describe the image", num_images=1)
    assert generate(fused, processor, prompt, image=[_image()], max_tokens=4, verbose=False).prompt_tokens > 0
