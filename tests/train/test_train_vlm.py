"""`adapterspec train` on a vision-language model: image–text data in mlx-vlm's layout through its processor,
batching and loss, LoRA on the language model and the vision tower at once; resume and two processes as for text."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlx_vlm")
import mlx.core as mx
from launch import MLX_LAUNCH, needs_mlx_launch
from mlx.utils import tree_flatten

from adapterspec.train.options import TrainOptions
from adapterspec.train.run import run

ROOT = Path(__file__).resolve().parents[2]
QWEN = str(ROOT / "examples" / "models" / "tiny-qwen2-vl")
DATA = ROOT / "examples" / "data-vlm"
SPEC = str(ROOT / "examples" / "specs" / "vlm-qwen2-vl.aspec")


def train(out: Path, model: str = QWEN, spec: str = SPEC, **settings):
    options = TrainOptions(
        model=model,
        spec=spec,
        data=str(DATA),
        adapter_path=str(out),
        learning_rate=2e-3,
        batch_size=4,
        steps_per_report=5,
        val_batches=2,
        steps_per_eval=1000,
        **settings,
    )
    return run(options, stream=io.StringIO())


def weights(path: Path) -> dict:
    return mx.load(str(path / "adapters.safetensors"))


def test_training_both_towers_lowers_the_loss_and_mlx_vlm_loads_the_result(tmp_path):
    from mlx_vlm import load as mlx_vlm_load

    result = train(tmp_path / "run", iters=30, save_every=30)
    first, last = result.val_losses[0][1], result.val_losses[-1][1]
    assert last < first - 1.0, result.val_losses
    trained = weights(tmp_path / "run")
    towers = {key.split(".")[0] for key in trained}
    assert towers == {"language_model", "vision_tower"}
    assert all(float(mx.abs(v).max()) > 0 for k, v in trained.items() if k.endswith("lora_b")), "every adapter trained"
    model, _ = mlx_vlm_load(QWEN, adapter_path=str(tmp_path / "run"))
    loaded = {k: v for k, v in tree_flatten(model.parameters()) if k in trained}
    assert loaded.keys() == trained.keys()
    assert all(mx.array_equal(loaded[k], trained[k]).item() for k in trained)


def test_a_resumed_vlm_run_gives_the_uninterrupted_runs_weights(tmp_path):
    train(tmp_path / "a", iters=8, save_every=4)
    resumed = train(tmp_path / "a", iters=16, save_every=4, resume=True)
    assert resumed.resumed_from == 8
    straight = train(tmp_path / "b", iters=16, save_every=4)
    expected, actual = weights(straight.out), weights(resumed.out)
    assert expected.keys() == actual.keys()
    assert all(mx.array_equal(expected[k], actual[k]).item() for k in expected)


def test_a_projector_trained_fully_beside_two_ranks(tmp_path):
    towers = str(ROOT / "examples" / "specs" / "vlm-towers.aspec")
    model = str(ROOT / "examples" / "models" / "tiny-paligemma")
    result = train(tmp_path / "run", model=model, spec=towers, iters=10, save_every=10)
    assert result.val_losses[-1][1] < result.val_losses[0][1]
    trained = weights(tmp_path / "run")
    assert "multi_modal_projector.linear.weight" in trained
    assert any(k.startswith("vision_tower.") and k.endswith("lora_a") and v.shape[1] == 4 for k, v in trained.items())


def test_vlm_data_that_mlx_vlm_cannot_read_is_a_diagnostic_before_training(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(DATA, data)
    lines = (data / "train.jsonl").read_text().splitlines()
    assert "images/train-002.png" in lines[2]

    def train_on(data_dir):
        argv = ["train", QWEN, SPEC, "--data", str(data_dir), "-o", str(tmp_path / "o"), "--iters", "2"]
        return subprocess.run([sys.executable, "-m", "adapterspec", *argv], capture_output=True, text=True, timeout=300)

    (data / "train.jsonl").write_text("\n".join([lines[0].replace("train-000.png", "missing.png"), *lines[1:]]) + "\n")
    result = train_on(data)
    assert result.returncode == 2, result.stderr
    assert "train.jsonl: example 1 cannot be processed" in result.stderr
    assert "missing.png" in result.stderr and "Traceback" not in result.stderr

    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    (data / "images" / "train-002.png").write_bytes(b"not an image")  # an internal error mid-training before
    result = train_on(data)
    assert result.returncode == 2, result.stderr
    assert "train.jsonl: example 3 cannot be processed" in result.stderr and "Traceback" not in result.stderr
    assert "val loss" not in result.stdout + result.stderr, "found before the model trains or validates"
    assert not (tmp_path / "o").exists()


@needs_mlx_launch
def test_two_processes_train_a_vlm_to_the_adapters_of_one(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "adapterspec", "train", QWEN, SPEC, "--data", str(DATA), "--learning-rate", "2e-3"]
    command += [
        "--batch-size",
        "4",
        "--iters",
        "6",
        "--save-every",
        "6",
        "--val-batches",
        "2",
        "--steps-per-eval",
        "1000",
    ]
    launch = [MLX_LAUNCH, "--backend", "ring", "-n", "2", "--"]
    result = subprocess.run(
        launch + command + ["-o", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "batch      4 over 2 processes" in result.stdout
    one = train(tmp_path / "one", iters=6, save_every=6)
    expected, actual = weights(one.out), weights(tmp_path / "two")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert mx.allclose(actual[key], expected[key], atol=1e-4, rtol=1e-3).item(), key


def test_example_vlm_data_is_what_its_script_writes(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("adapterspec_example_vlm_data", DATA / "make_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.make_data(tmp_path)
    for split in ("train", "valid", "test"):
        assert (tmp_path / f"{split}.jsonl").read_text() == (DATA / f"{split}.jsonl").read_text()
    images = sorted(p.name for p in (DATA / "images").iterdir())
    assert images == sorted(p.name for p in (tmp_path / "images").iterdir()) and len(images) == 96
    assert all((tmp_path / "images" / n).read_bytes() == (DATA / "images" / n).read_bytes() for n in images)


def test_mask_prompt_trains_on_the_answers_only(tmp_path):
    """--mask-prompt is mlx-vlm's train_on_completions: the loss counts the assistant's tokens, not the prompt's
    (the question and the image tokens)."""
    every = train(tmp_path / "all", iters=2, save_every=2)
    answers = train(tmp_path / "answers", iters=2, save_every=2, mask_prompt=True)
    assert 0 < answers.trained_tokens < every.trained_tokens / 2
