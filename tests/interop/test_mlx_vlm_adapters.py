"""Adapters written by mlx-vlm's own trainer (its get_peft_model and save_adapter, full-path keys, the vision
tower included) are read by adapterspec: load_adapters gives mlx-vlm's outputs, import translates the config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlx_vlm")
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_vlm import load as mlx_vlm_load
from mlx_vlm.prompt_utils import apply_chat_template
from mlx_vlm.trainer.peft.utils import get_peft_model, save_adapter
from mlx_vlm.utils import prepare_inputs
from PIL import Image

import adapterspec
from adapterspec.adapters.loading import load_model

ROOT = Path(__file__).resolve().parents[2]
QWEN = ROOT / "examples" / "models" / "tiny-qwen2-vl"
IMAGE = ROOT / "examples" / "data-vlm" / "images" / "test-000.png"
KEYS = ["q_proj", "v_proj", "vision_tower.blocks.1.attn.qkv"]


@pytest.fixture(scope="module")
def theirs(tmp_path_factory):
    model, processor = mlx_vlm_load(str(QWEN))
    model = get_peft_model(model, KEYS, rank=4, alpha=8, dropout=0.0, verbose=False)
    mx.random.seed(2)
    model.load_weights(
        [(k, mx.random.normal(v.shape) * 0.01) for k, v in tree_flatten(model.trainable_parameters())], strict=False
    )
    model.eval()
    directory = tmp_path_factory.mktemp("mlx-vlm-adapters")
    save_adapter(model, directory / "adapters.safetensors")
    return directory, model, processor


def test_load_adapters_reads_an_mlx_vlm_adapter_directory_to_its_outputs(theirs):
    directory, model, processor = theirs
    ours, _ = load_model(QWEN)
    plan = adapterspec.load_adapters(ours, directory)
    paths = {e.path for e in plan.entries}
    assert "vision_tower.blocks.1.attn.qkv" in paths and "language_model.model.layers.0.self_attn.q_proj" in paths
    assert {e.r for e in plan.entries} == {4} and {e.scale for e in plan.entries} == {2.0}
    prompt = apply_chat_template(processor, model.config, "what is in the image?", num_images=1)
    inputs = prepare_inputs(
        processor, images=[Image.open(IMAGE)], prompts=[prompt], image_token_index=model.config.image_token_id
    )
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}

    def logits(m):
        return np.array(m(inputs["input_ids"], inputs["pixel_values"], mask=inputs["attention_mask"], **extra).logits)

    np.testing.assert_allclose(logits(ours), logits(model), atol=1e-4)


def test_import_translates_the_mlx_vlm_config_into_a_spec(theirs):
    directory, _, _ = theirs
    result = subprocess.run(
        [sys.executable, "-m", "adapterspec", "import", "mlx-lm", str(directory), "--model", str(QWEN)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "/vision_tower.blocks.1.attn.qkv: lora(r=4, scale=2.0, dropout=0.0)" in result.stdout
    assert "/language_model.model.layers.1.self_attn.v_proj: lora(r=4, scale=2.0, dropout=0.0)" in result.stdout


def test_peft_export_of_a_vlm_is_refused_with_the_reason(theirs, tmp_path):
    directory, _, _ = theirs
    result = subprocess.run(
        [sys.executable, "-m", "adapterspec", "export", "peft", str(QWEN), str(directory), "-o", str(tmp_path / "p")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "a vision-language model; adapterspec cannot export PEFT adapters for it yet" in result.stderr
    assert not (tmp_path / "p").exists()
