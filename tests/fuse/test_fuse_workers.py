"""The fuse's worker processes: no mlx in them, no guard needed in the caller's script, failures reported, none left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core")

import models as tiny  # noqa: E402
from fuse_support import (  # noqa: E402
    MLX_LM_SPEC,
    fuse_in_memory,
    read_weights,
    tree_hash,
    write_adapters,
)

from adapterspec.errors import UserError  # noqa: E402
from adapterspec.fuse.plan import plan_fuse  # noqa: E402
from adapterspec.fuse.stream import chunks_of  # noqa: E402
from adapterspec.fuse.workers import MergeWorkers, WorkerFailed, merge_task, task_for  # noqa: E402
from adapterspec.processes import python_module  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
Q4 = {"group_size": 64, "bits": 4, "mode": "affine"}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    model = tiny.write(root / "model", "llama", dtype="float16", quantization=Q4)
    return model, write_adapters(model, root / "adapters", MLX_LM_SPEC)


def tasks_of(model, adapters, chunk_bytes=1 << 14):
    units = plan_fuse(model, adapters).fused_units
    return [task_for(c.unit, c.rows) for unit in units for c in chunks_of(unit, chunk_bytes)]


def test_a_worker_imports_neither_mlx_nor_pydantic():
    code = "import sys, adapterspec.fuse.workers; print(sorted({m.split('.')[0] for m in sys.modules} & {'mlx', 'mlx_lm', 'pydantic', 'transformers'}))"
    probe = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"


def test_the_fuse_path_imports_neither_pydantic_nor_lark():
    """Spec parsing and validation stay off a fuse's start: an adapter directory of ours holds its resolved plan."""
    code = ("import sys, adapterspec.fuse.run, adapterspec.fuse.erasure, adapterspec.fuse.stream, adapterspec.commands.fuse; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'pydantic', 'lark', 'mlx_lm'}))")  # fmt: skip
    probe = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"


def test_workers_give_what_the_task_computes_in_process(quantized):
    tasks = tasks_of(*quantized)
    assert len(tasks) > 4
    with MergeWorkers(2) as workers:
        futures = [workers.submit(task) for task in tasks]
        results = [future.result(timeout=120) for future in futures]
    assert len(workers.peak_rss) == 2 and all(0 < peak < 1 << 30 for peak in workers.peak_rss)
    for task, result in zip(tasks, results):
        expected = merge_task(task)
        assert result.keys() == expected.keys()
        assert all((result[name] == expected[name]).all() for name in expected)


def test_a_dead_worker_fails_its_tasks_instead_of_hanging(quantized):
    task = tasks_of(*quantized)[0]
    workers = MergeWorkers(1)
    try:
        workers._processes[0].kill()
        with pytest.raises(WorkerFailed) as failed:
            workers.submit(task).result(timeout=60)
        assert isinstance(failed.value, UserError) and "ADAPTERSPEC_FUSE_WORKERS" in failed.value.help
        with pytest.raises(WorkerFailed):  # no worker left: later tasks fail at once
            workers.submit(task).result(timeout=60)
    finally:
        workers.close()


def test_the_other_worker_goes_on_when_one_dies(quantized):
    tasks = tasks_of(*quantized)
    workers = MergeWorkers(2)
    try:
        workers._processes[1].kill()
        outcomes = []
        for future in [workers.submit(task) for task in tasks]:
            try:
                outcomes.append(future.result(timeout=120))
            except WorkerFailed:
                outcomes.append(None)
        assert sum(o is None for o in outcomes) <= 1 and sum(o is not None for o in outcomes) >= len(tasks) - 1
    finally:
        workers.close()


def test_a_script_without_a_main_guard_can_fuse(quantized, tmp_path):
    """Workers are started as `python -m adapterspec.fuse.workers`: the caller's script is not run again in them."""
    model, adapters = quantized
    script = tmp_path / "fuse_it.py"
    script.write_text(
        "from adapterspec.fuse.run import fuse_model_dir\n"
        f"result = fuse_model_dir({str(model)!r}, {str(adapters)!r}, {str(tmp_path / 'out')!r}, requantization='plain')\n"
        "print('workers', len(result.worker_peak_rss))\n"
    )
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] != "workers 0"
    ours, reference = read_weights(tmp_path / "out"), fuse_in_memory(model, adapters)
    for name, value in reference.items():
        assert mx.array_equal(ours[name], value).item(), name


WORKER = "adapterspec.fuse.workers"


def processes_tagged(tag: str, only: str = "") -> list[int]:
    """The processes whose environment holds `tag` (and whose command line holds `only`, if given)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if tag.encode() in (entry / "environ").read_bytes() and (
                    not only or only.encode() in (entry / "cmdline").read_bytes()
                ):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_an_interrupted_fuse_leaves_no_worker_running(quantized, tmp_path, how):
    model, adapters = quantized
    before = tree_hash(model), tree_hash(adapters)
    tag = f"ADAPTERSPEC_TEST_TAG={uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), tag.split("=")[0]: tag.split("=")[1]}
    slow_fuse = str(Path(__file__).with_name("slow_fuse.py"))
    process = subprocess.Popen([sys.executable, slow_fuse, "0.5", "fuse", str(model), str(adapters), "-o", str(tmp_path / "out")],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        # the worker processes, by their command line (the environment also tags the check of the saved plan and
        # whatever else the fuse starts, such as the C compiler building its loops at a machine's first fuse)
        while len(processes_tagged(tag, only=WORKER)) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None and len(processes_tagged(tag, only=WORKER)) >= 2
        process.send_signal(getattr(signal, how))
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    deadline = time.monotonic() + 30
    while processes_tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_tagged(tag) == []
    assert not (tmp_path / "out").exists()
    assert (tree_hash(model), tree_hash(adapters)) == before


def test_child_processes_import_this_package_even_where_it_is_not_installed(tmp_path):
    """The worker and spec-check processes run `python -m adapterspec…`: with site-packages left out (-S), from
    another directory, only the environment they are given can find the package, and it must be this one."""
    command, env = python_module("adapterspec.fuse.spec_check")
    probe = [command[0], "-S", "-c", "import adapterspec; print(adapterspec.__file__)"]
    found = subprocess.run(probe, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()).resolve() == Path(sys.modules["adapterspec"].__file__).resolve()
