"""`adapterspec train` as processes: killed with SIGKILL and resumed, and data-parallel over two processes
(mlx.launch, ring backend on loopback), resumed too, against one process with the same global batch."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import models as tiny
import pytest
from launch import MLX_LAUNCH, needs_mlx_launch

from adapterspec.train.checkpoint import list_checkpoints
from adapterspec.train.options import TrainOptions
from adapterspec.train.run import run

ROOT = Path(__file__).resolve().parents[2]
LLAMA = str(tiny.example_model_dir("tiny-llama"))
DATA = str(ROOT / "examples" / "data")
SPEC = "adapterspec 1\nself_attn.<q_proj,v_proj>: lora(r=8, scale=20)\nlayers[-1].mlp.<up_proj,down_proj>: lora(r=4)\n"
COMMON = [
    "--data",
    DATA,
    "--learning-rate",
    "1e-3",
    "--steps-per-report",
    "5",
    "--val-batches",
    "1",
    "--steps-per-eval",
    "1000",
]


def environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def command(spec: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "adapterspec", "train", LLAMA, str(spec), *COMMON, "-o", str(out), *extra]


def in_process(spec: Path, out: Path, **settings):
    options = TrainOptions(
        model=LLAMA,
        spec=str(spec),
        data=DATA,
        adapter_path=str(out),
        learning_rate=1e-3,
        steps_per_report=5,
        val_batches=1,
        steps_per_eval=1000,
        **settings,
    )
    return run(options, stream=io.StringIO())


def weights(path: Path) -> dict:
    return mx.load(str(path / "adapters.safetensors"))


@pytest.fixture
def spec(tmp_path) -> Path:
    path = tmp_path / "spec.aspec"
    path.write_text(SPEC)
    return path


def test_a_killed_run_resumes_to_the_uninterrupted_runs_weights(tmp_path, spec):
    out = tmp_path / "killed"
    process = subprocess.Popen(
        command(spec, out, "--iters", "100000", "--save-every", "4"),
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    try:
        while not any(step >= 8 for step, _ in list_checkpoints(out)):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within two minutes"
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    killed_at = list_checkpoints(out)[-1][0]
    assert 8 <= killed_at < 24
    resumed = subprocess.run(
        command(spec, out, "--iters", "24", "--save-every", "4", "--resume"),
        env=environment(),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {out / 'checkpoints' / f'{killed_at:07d}'}" in resumed.stdout
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")], (
        "a half-written checkpoint was left"
    )

    straight = in_process(spec, tmp_path / "straight", iters=24, save_every=4)
    expected, actual = weights(straight.out), weights(out)
    assert expected.keys() == actual.keys()
    assert all(mx.array_equal(expected[k], actual[k]).item() for k in expected)


@needs_mlx_launch
def test_two_processes_train_and_resume_to_the_adapters_of_one_with_the_same_global_batch(tmp_path, spec):
    two_processes_equal_one(tmp_path, spec)


GROUPED = """\
defaults lora(r=4, scale=2, init=pissa, loraplus=8)
self_attn.<q_proj,v_proj>: lora
layers[-1].mlp.down_proj: lora(lr_scale=0.5)
embed_tokens: tokens([40, 41], lr_scale=2)
layers[0].input_layernorm: full(lr_scale=0.1)
"""


@needs_mlx_launch
def test_per_rule_groups_inits_and_token_rows_train_alike_over_two_processes(tmp_path):
    path = tmp_path / "grouped.aspec"
    path.write_text(GROUPED)
    two_processes_equal_one(tmp_path, path)


def two_processes_equal_one(tmp_path, spec):
    out = tmp_path / "two"
    launch = [MLX_LAUNCH, "--backend", "ring", "-n", "2", "--"]
    for extra in (["--iters", "6"], ["--iters", "12", "--resume"]):
        result = subprocess.run(
            launch + command(spec, out, "--save-every", "6", "--batch-size", "4", *extra),
            env=environment(),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "batch      4 over 2 processes" in result.stdout
        assert result.stdout.count("saved ") == 1, "only rank 0 reports and writes checkpoints"
    assert "resuming from" in result.stdout, "rank 0 read the checkpoint and sent its state to rank 1"

    one = in_process(spec, tmp_path / "one", iters=12, save_every=6, batch_size=4)
    expected, actual = weights(one.out), weights(out)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert mx.allclose(actual[key], expected[key], atol=1e-4, rtol=1e-3).item(), key
    assert [step for step, _ in list_checkpoints(out)] == [6, 12]
