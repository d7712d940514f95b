"""The base layer's promises about files: outputs appear whole or not at all, `--force` replaces only what a
command writes, a killed process's temporaries are removed by the next run, and only regular files are read."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from adapterspec.errors import UserError
from adapterspec.inputs import open_regular
from adapterspec.outputs import (
    atomic_output_dir,
    check_output_dir,
    check_output_file,
    remove_stale_temporaries,
    write_file_atomic,
)

PRODUCES = ("adapters.safetensors", "adapter_config.json")


def filled(path, *names):
    path.mkdir(parents=True, exist_ok=True)
    for name in names:
        (path / name).write_text(name)
    return path


def test_an_output_appears_only_when_the_block_succeeds(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(dest, produces=PRODUCES) as tmp:
            (tmp / "adapters.safetensors").write_text("half")
            raise RuntimeError("failed half-way")
    assert not dest.exists() and list(tmp_path.iterdir()) == []
    with atomic_output_dir(dest, produces=PRODUCES) as tmp:
        (tmp / "adapters.safetensors").write_text("whole")
    assert (dest / "adapters.safetensors").read_text() == "whole" and list(tmp_path.iterdir()) == [dest]


def test_force_replaces_a_previous_output_but_never_a_users_file(tmp_path):
    previous = filled(tmp_path / "previous", *PRODUCES)
    with atomic_output_dir(previous, force=True, produces=PRODUCES) as tmp:
        (tmp / "adapter_config.json").write_text("new")
    assert sorted(p.name for p in previous.iterdir()) == ["adapter_config.json"]
    mine = filled(tmp_path / "mine", "adapter_config.json", "notes.txt")
    with pytest.raises(UserError, match=r"notes\.txt"):
        check_output_dir(mine, force=True, produces=PRODUCES)
    with pytest.raises(UserError, match="not empty"):
        check_output_dir(mine, force=False, produces=PRODUCES)
    assert sorted(p.name for p in mine.iterdir()) == ["adapter_config.json", "notes.txt"]


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_an_output_overlapping_an_input_is_refused(tmp_path, where):
    model = filled(tmp_path / "model", "config.json")
    dest = {"same": model, "inside": model / "out", "around": tmp_path}[where]
    with pytest.raises(UserError, match="overlaps the input directory"):
        check_output_dir(dest, force=True, protect=[model])
    with pytest.raises(UserError, match="overlaps the input file"):
        check_output_file(model / "config.json", protect=[model / "config.json"])


def test_an_output_whose_parent_cannot_be_made_is_refused(tmp_path):
    (tmp_path / "plain.txt").write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        check_output_dir(tmp_path / "plain.txt" / "out", force=False)
    with pytest.raises(UserError, match="does not exist"):
        check_output_file(tmp_path / "nodir" / "report.json")


def test_a_killed_processs_temporaries_are_removed_and_a_living_ones_kept(tmp_path):
    dest = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = filled(tmp_path / f".out.tmp-{int(dead.stdout)}-abcd", "model.safetensors")
    alive = filled(tmp_path / f".out.tmp-{os.getpid()}-ef01", "model.safetensors")
    foreign = filled(tmp_path / ".out.tmp-notours", "x")
    assert remove_stale_temporaries(dest) == [stale]
    assert alive.is_dir() and foreign.is_dir()


def test_a_file_written_atomically_keeps_the_mode_asked_for(tmp_path):
    target = tmp_path / "a.aspec"
    target.write_text("old")
    write_file_atomic(target, "new", mode=0o640)
    assert target.read_text() == "new" and (target.stat().st_mode & 0o777) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["a.aspec"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_at_once_instead_of_blocking(tmp_path):
    fifo = tmp_path / "spec.aspec"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="not a regular file"):
        open_regular(fifo)
    with pytest.raises(UserError, match="is a directory"):
        open_regular(tmp_path)
    with pytest.raises(UserError, match="no such file"):
        open_regular(tmp_path / "missing")
