"""The command line's one boundary: a bug is one line and exit 3 (the traceback only with --debug), a missing
MLX extra names the extra, an interrupt is exit 130, and a user error is its message and exit 2."""

from __future__ import annotations

import pytest

from adapterspec import cli
from adapterspec.errors import UserError

SPEC = "examples/specs/attention.aspec"


def failing_plan(error: BaseException):
    def run(args):
        raise error

    return run


@pytest.fixture
def plan_raises(monkeypatch):
    """Make `adapterspec plan` raise the given exception from inside the command."""
    from adapterspec.commands import plan

    def install(error: BaseException) -> None:
        monkeypatch.setattr(plan, "run", failing_plan(error))

    return install


def test_a_bug_is_one_line_asking_for_a_report_and_exit_3(plan_raises, capsys, monkeypatch):
    monkeypatch.delenv("ADAPTERSPEC_DEBUG", raising=False)
    plan_raises(ValueError("an unexpected value"))
    assert cli.main(["plan", "m", SPEC]) == 3
    err = capsys.readouterr().err
    assert "internal error: ValueError: an unexpected value" in err and "please report it" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_debug_adds_the_traceback(plan_raises, capsys, monkeypatch, how):
    plan_raises(KeyError("x"))
    argv = ["plan", "m", SPEC]
    if how == "flag":
        argv.insert(0, "--debug")
    else:
        monkeypatch.setenv("ADAPTERSPEC_DEBUG", "1")
    assert cli.main(argv) == 3
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_a_missing_mlx_names_the_extra_to_install(plan_raises, capsys):
    plan_raises(ModuleNotFoundError("No module named 'mlx'", name="mlx"))
    assert cli.main(["plan", "m", SPEC]) == 2
    assert "pip install 'adapterspec[mlx]'" in capsys.readouterr().err


def test_a_user_error_is_its_message_and_help(plan_raises, capsys):
    plan_raises(UserError("m/config.json: num_attention_heads is 0", help="fix the config"))
    assert cli.main(["plan", "m", SPEC]) == 2
    err = capsys.readouterr().err
    assert "adapterspec plan: error: m/config.json: num_attention_heads is 0" in err and "help: fix the config" in err


def test_an_interrupt_is_exit_130(plan_raises, capsys):
    plan_raises(KeyboardInterrupt())
    assert cli.main(["plan", "m", SPEC]) == 130
    assert "interrupted" in capsys.readouterr().err
