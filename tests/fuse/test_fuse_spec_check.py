"""The fuse runs from an adapter directory's saved plan while a process beside it checks the plan against the spec:
the same errors as when the check came first, nothing published before it answers, the spec's plan deciding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core")

import models as tiny  # noqa: E402
from fuse_support import MLX_LM_SPEC, MOE_SPEC, write_adapters  # noqa: E402

from adapterspec.cli import main  # noqa: E402
from adapterspec.errors import UserError  # noqa: E402
from adapterspec.fuse.adapter_source import saved_modules  # noqa: E402
from adapterspec.fuse.run import fuse_model_dir  # noqa: E402
from adapterspec.model.adapter_format import ADAPTER_CONFIG, plan_of, read_adapter_config  # noqa: E402
from adapterspec.model.index import ModuleIndex  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ORDERED_FUSE = Path(__file__).with_name("ordered_fuse.py")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny.write(tmp_path_factory.mktemp("model") / "llama", "llama", dtype="float16")


@pytest.fixture(scope="module")
def adapters(model, tmp_path_factory):
    return write_adapters(model, tmp_path_factory.mktemp("adapters") / "a", MLX_LM_SPEC)


def edited(adapters: Path, directory: Path, change) -> Path:
    """A copy of the adapter directory whose saved plan's modules `change` rewrote."""
    directory.mkdir()
    for item in adapters.iterdir():
        (directory / item.name).write_bytes(item.read_bytes())
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    config["adapterspec"]["plan"]["modules"] = change(config["adapterspec"]["plan"]["modules"])
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config))
    return directory


def error_of_the_check(model: Path, adapters: Path) -> UserError:
    with pytest.raises(UserError) as error:
        plan_of(read_adapter_config(adapters), ModuleIndex.from_model_dir(model), adapters)
    return error.value


def left_beside(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith((out.name, f".{out.name}")))


EDITS = {
    "a module dropped": lambda modules: modules[1:],
    "another rank": lambda modules: [{**modules[0], "r": 8}, *modules[1:]],
    "a module the model lacks": lambda modules: [{**modules[0], "path": "model.layers.0.mlp.gate"}, *modules[1:]],
    "the order changed": lambda modules: modules[::-1],
}


@pytest.mark.parametrize("edit", EDITS)
def test_a_saved_plan_that_is_not_the_specs_fails_as_before_and_leaves_nothing(model, adapters, tmp_path, edit):
    directory = edited(adapters, tmp_path / "adapters", EDITS[edit])
    expected = error_of_the_check(model, directory)
    with pytest.raises(UserError) as error:
        fuse_model_dir(model, directory, tmp_path / "out")
    assert (error.value.message, error.value.help, error.value.exit_code) == (
        expected.message,
        expected.help,
        expected.exit_code,
    )
    assert left_beside(tmp_path / "out") == []


def test_adapters_of_another_model_fail_with_the_checks_error(model, tmp_path):
    moe = tiny.write(tmp_path / "moe", "mixtral")
    adapters = write_adapters(moe, tmp_path / "adapters", MOE_SPEC)
    expected = error_of_the_check(model, adapters)
    with pytest.raises(UserError) as error:
        fuse_model_dir(model, adapters, tmp_path / "out", strict=True, keep_precision="auto")
    assert error.value.message == expected.message
    assert left_beside(tmp_path / "out") == []


def test_the_checks_error_comes_first_on_the_command_line_too(model, adapters, tmp_path, capsys):
    directory = edited(adapters, tmp_path / "adapters", EDITS["another rank"])
    expected = error_of_the_check(model, directory)
    report = tmp_path / "report.json"
    code = main(["fuse", str(model), str(directory), "-o", str(tmp_path / "out"), "--strict", "--report-json",
                 str(report), "--quiet"])  # fmt: skip
    assert code == expected.exit_code
    assert f"error: {expected.message}" in capsys.readouterr().err
    assert not report.exists() and left_beside(tmp_path / "out") == []


def test_an_edited_scale_in_the_saved_plan_is_refused(model, adapters, tmp_path):
    """The spec decides the scales; an edit to the saved plan's would go unread (mlx-lm reads neither), so it is named
    rather than ignored."""
    directory = edited(adapters, tmp_path / "adapters", lambda ms: [{**m, "scale": 7 * m["scale"]} for m in ms])
    with pytest.raises(UserError, match=r"the saved plan gives '.*' scale 14, its spec 2 \(the config was edited\)"):
        fuse_model_dir(model, directory, tmp_path / "edited")
    assert not (tmp_path / "edited").exists() and left_beside(tmp_path / "edited") == []


def test_a_saved_plan_without_a_tokens_adapters_rows_is_not_used():
    tokens = {"path": "model.embed_tokens", "adapter": "embedding-tokens", "r": None, "scale": None}
    lora = {"path": "model.layers.0.self_attn.q_proj", "adapter": "lora", "r": 4, "scale": 2.0}
    assert saved_modules({"adapterspec": {"spec": "", "plan": {"modules": [tokens, lora]}}}) is None
    assert saved_modules({"adapterspec": {"spec": "", "plan": {"modules": [{**tokens, "rows": [3, 5]}]}}})[0].rows == (
        3,
        5,
    )
    assert saved_modules({"adapterspec": {"spec": ""}}) is None
    assert saved_modules({"fine_tune_type": "lora"}) is None


def test_the_check_runs_beside_the_writing_and_the_fuse_never_loads_the_spec_language_or_the_layers(
    model, adapters, tmp_path
):
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ORDERED_FUSE), "fuse", str(model), str(adapters), "-o", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, check=True)
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["code"] == 0, done.stderr
    assert answer["events"] == [
        "check starting",
        "check started",
        "writing",
        "written",
        "check waited for",
        "check answered",
    ]
    assert answer["spec_language_loaded"] == []
    assert answer["adapter_layers_loaded"] == []  # nor mlx.nn: the merges need `fusemath` alone
    assert (tmp_path / "out" / "config.json").is_file()
