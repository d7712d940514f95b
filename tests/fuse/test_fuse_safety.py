"""fuse in its own process: bounded memory on a multi-shard model, and nothing left at the output when killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core")

import models as tiny  # noqa: E402
from fuse_support import (  # noqa: E402
    MLX_LM_SPEC,
    read_weights,
    tree_hash,
    write_adapters,
    write_sharded,
)

ROOT = Path(__file__).resolve().parents[2]
ALL_LINEARS = """adapterspec 1

layers[*].self_attn.<q,k,v,o>_proj: lora(r=8, scale=20.0)
layers[*].mlp.<gate,up,down>_proj: lora(r=8, scale=20.0)
"""
# Imports everything, notes the resident memory, fuses, then reports the peak (VmHWM) and the baseline.
MEMORY_PROBE = """
import json, sys
from adapterspec.fuse.run import fuse_model_dir
import mlx.core as mx
from adapterspec.fuse import erasure as fuse_erasure, stream as fuse_stream  # imported before the baseline

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

baseline = rss("VmRSS:")
result = fuse_model_dir(sys.argv[1], sys.argv[2], sys.argv[3])
print(json.dumps({"baseline": baseline, "peak": rss("VmHWM:"), "workers": result.worker_peak_rss}))
"""


SLOW_FUSE = Path(__file__).with_name("slow_fuse.py")


def run_fuse(*args, pause: float = 0.0, **popen) -> subprocess.Popen:
    """`adapterspec fuse ARGS` in a process of its own, pausing `pause` seconds between its pieces of work."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(SLOW_FUSE), str(pause), "fuse", *map(str, args)]
    return subprocess.Popen(
        command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    model = tiny.write(root / "model", "llama", dtype="float16")
    return model, write_adapters(model, root / "adapters", MLX_LM_SPEC)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from /proc")
@pytest.mark.parametrize(
    "quantization", [None, {"group_size": 64, "bits": 4, "mode": "affine"}], ids=["float16", "4bit"]
)
def test_peak_memory_stays_near_one_shard_on_a_multi_shard_model(tmp_path, quantization):
    """The fuse's own growth plus every worker process's whole peak stays within one shard + adapters + 300 MB."""
    model, config = tiny.build("llama", dtype="float16", hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                               num_attention_heads=16, num_key_value_heads=4, vocab_size=16000, quantization=quantization)  # fmt: skip
    model_dir = write_sharded(model, config, tmp_path / "model", shards=8, with_tokenizer=False)
    del model
    adapters = write_adapters(model_dir, tmp_path / "adapters", ALL_LINEARS)
    shards = list(model_dir.glob("*.safetensors"))
    total, largest = sum(f.stat().st_size for f in shards), max(f.stat().st_size for f in shards)
    adapter_bytes = (adapters / "adapters.safetensors").stat().st_size
    assert len(shards) >= 8 and total > (190e6 if quantization is None else 50e6)

    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, model_dir, adapters, tmp_path / "out"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    memory = json.loads(probe.stdout.strip().splitlines()[-1])
    own_growth = memory["peak"] - memory["baseline"]
    growth = own_growth + sum(memory["workers"])
    assert len(memory["workers"]) >= 2  # plain LoRA merges on worker processes, dense or quantized
    assert growth <= largest + adapter_bytes + (300 << 20)
    # A worker holds one chunk at a time: its peak is its interpreter and numpy, whatever the model's size.
    assert all(peak < 128 << 20 for peak in memory["workers"]), memory["workers"]
    if quantization is None:
        # Far less than the model: the fuse itself never holds more than a few chunks of modules.
        assert own_growth < 0.75 * total, (own_growth / 1e6, total / 1e6)
    assert len(list((tmp_path / "out").glob("*.safetensors"))) == 1


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the fuse did not get far enough in time")
        time.sleep(0.02)


def written_shard(parent: Path, name: str):
    """A shard file with some tensor bytes in a temporary output directory of `name`, if there is one yet."""
    for tmp in parent.glob(f".{name}.tmp-*"):
        for shard in tmp.glob("*.safetensors"):
            if shard.stat().st_size > 4096:
                return shard
    return None


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT", "SIGTERM"])
def test_an_interrupted_fuse_leaves_nothing_at_the_output(small, tmp_path, how):
    model, adapters = small
    before = tree_hash(model), tree_hash(adapters)
    out = tmp_path / "out"
    process = run_fuse(model, adapters, "-o", out, "--max-shard-size", "20000", pause=0.2)
    try:
        wait_for(lambda: written_shard(tmp_path, "out") is not None or process.poll() is not None)
        assert process.poll() is None, process.communicate()
        process.send_signal(getattr(signal, how))
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert not out.exists()
    assert (tree_hash(model), tree_hash(adapters)) == before
    leftovers = list(tmp_path.glob(".out.tmp-*"))
    if how == "SIGKILL":
        assert process.returncode == -signal.SIGKILL and len(leftovers) == 1
        again = run_fuse(model, adapters, "-o", out, "--quiet")
        _, stderr = again.communicate(timeout=120)
        assert again.returncode == 0, stderr
        assert f"removed {leftovers[0]}, left by an interrupted fuse" in stderr
        assert list(tmp_path.glob(".out.tmp-*")) == [] and read_weights(out)
    else:
        assert process.returncode == 130 and "interrupted" in stderr
        assert leftovers == []


def test_a_running_fuse_keeps_its_temporary_directory(small, tmp_path):
    from adapterspec.outputs import remove_stale_temporaries as remove_stale_temp_dirs

    model, adapters = small
    process = run_fuse(model, adapters, "-o", tmp_path / "out", pause=0.2)
    try:
        wait_for(lambda: written_shard(tmp_path, "out") is not None or process.poll() is not None)
        assert remove_stale_temp_dirs(tmp_path / "out") == []
        assert len(list(tmp_path.glob(".out.tmp-*"))) == 1
    finally:
        process.kill()
        process.communicate()
    foreign = tmp_path / ".out.tmp-notours"
    foreign.mkdir()
    removed = remove_stale_temp_dirs(tmp_path / "out")
    assert len(removed) == 1 and foreign.is_dir()


def test_an_interrupt_interrupts_a_fuse_started_with_sigint_ignored(small, tmp_path):
    """Some CI runners start their commands with SIGINT ignored: the program restores the interrupt."""
    model, adapters = small
    out = tmp_path / "out"
    process = run_fuse(
        model, adapters, "-o", out, pause=0.2, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)
    )
    try:
        wait_for(lambda: written_shard(tmp_path, "out") is not None or process.poll() is not None)
        assert process.poll() is None, process.communicate()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130 and "interrupted" in stderr
    assert not out.exists() and list(tmp_path.glob(".out.tmp-*")) == []
