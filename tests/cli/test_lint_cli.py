"""`adapterspec lint` end to end, and the Python API it shares with library users."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

import adapterspec
from adapterspec.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "specs").glob("*.aspec"))
LLAMA = str(ROOT / "examples" / "models" / "tiny-llama")

GOOD = "adapterspec 1\nlayers[*].self_attn.<q,v>_proj: lora(r=8)\n"
WARNS = "q_proj: lora\nq_proj: lora\n"
BAD = "q_proj: lora(rank=8)\nk_proj lora\n"


@pytest.fixture
def write(tmp_path):
    def write(name: str, content: str | bytes) -> str:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return str(path)

    return write


def lint(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["lint", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- exit codes and output ---------------------------------------------------------------------


def test_clean_file_exits_0_silently(capsys, write):
    assert lint(capsys, write("a.aspec", GOOD)) == (0, "", "")


def test_warnings_print_but_exit_0(capsys, write):
    code, out, _ = lint(capsys, write("a.aspec", WARNS))
    assert code == 0
    assert "a.aspec:1:1: AS402 warning: duplicate rule" in out
    assert "0 errors, 1 warning in 1 file (1 checked)" in out


def test_strict_makes_warnings_fail(capsys, write):
    assert lint(capsys, "--strict", write("a.aspec", WARNS))[0] == 1
    assert lint(capsys, "--strict", write("b.aspec", GOOD))[0] == 0


def test_errors_exit_1_with_source_carets_and_help(capsys, write):
    path = write("a.aspec", BAD)
    code, out, _ = lint(capsys, path)
    assert code == 1
    assert out.startswith(
        f"{path}:1:14: AS201 unknown argument 'rank' for lora (did you mean 'r'?)\n"
        "  1 | q_proj: lora(rank=8)\n"
        "    |              ^^^^\n"
        "  help: lora takes r, scale, alpha, rslora, dropout, init, lr_scale, loraplus, weight_decay\n"
    )
    assert f"{path}:2:7: AS103 space inside a selector" in out


def test_all_diagnostics_of_all_files_in_one_run(capsys, write):
    first, second = write("a.aspec", BAD), write("b.aspec", "x: lorra\ny: lora(r=0)\n")
    code, out, _ = lint(capsys, first, write("ok.aspec", GOOD), second)
    assert code == 1
    found = [line.split(": ")[1].split()[0] for line in out.splitlines() if line.startswith(str(Path(first).parent))]
    assert found == ["AS201", "AS103", "AS202", "AS205"]
    assert "4 errors, 0 warnings in 2 files (3 checked)" in out


def test_missing_file_is_exit_2_after_linting_the_others(capsys, write, tmp_path):
    code, out, err = lint(capsys, write("a.aspec", BAD), str(tmp_path / "missing.aspec"))
    assert code == 2
    assert "AS201" in out
    assert f"adapterspec lint: error: {tmp_path / 'missing.aspec'}: no such file" in err
    assert "Traceback" not in err


def test_unreadable_file_is_exit_2(capsys, write):
    path = Path(write("a.aspec", GOOD))
    path.chmod(0)
    try:
        if path.open("rb"):  # running as root: permissions do not apply
            pytest.skip("permissions are not enforced for this user")
    except PermissionError:
        code, _, err = lint(capsys, str(path))
        assert code == 2 and "cannot read" in err
    finally:
        path.chmod(0o644)


def test_usage_error_is_exit_2(capsys):
    assert main(["lint"]) == 2
    assert main(["lint", "--format", "xml", "a.aspec"]) == 2
    capsys.readouterr()


def test_directory_is_searched_for_specs(capsys, write, tmp_path):
    write("specs/a.aspec", GOOD)
    write("specs/deeper/b.aspec", BAD)
    write("specs/notes.txt", "not a spec")
    code, out, _ = lint(capsys, str(tmp_path / "specs"))
    assert code == 1 and "b.aspec:1:14: AS201" in out and "notes.txt" not in out
    assert "(2 checked)" in out


def test_directory_without_specs_is_exit_2(capsys, tmp_path):
    code, _, err = lint(capsys, str(tmp_path))
    assert code == 2 and f"{tmp_path}: no *.aspec files there" in err


def test_stdin(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(BAD.encode())))
    code, out, _ = lint(capsys, "-")
    assert code == 1 and out.startswith("<stdin>:1:14: AS201")


def test_every_example_lints_clean(capsys):
    assert len(EXAMPLES) >= 7
    assert lint(capsys, "--strict", *map(str, EXAMPLES)) == (0, "", "")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_lints_clean_against_its_model(capsys, path):
    header = next(line for line in path.read_text().splitlines() if line.startswith("# model: "))
    model = ROOT / header.removeprefix("# model: ")
    assert lint(capsys, "--strict", str(path), "--model", str(model)) == (0, "", "")


# --- formats -----------------------------------------------------------------------------------


def test_json_format_is_one_object_per_diagnostic(capsys, write):
    path = write("a.aspec", BAD)
    code, out, _ = lint(capsys, "--format", "json", path, write("b.aspec", WARNS))
    assert code == 1
    objects = [json.loads(line) for line in out.splitlines()]
    assert [(o["file"][-7:], o["code"], o["severity"]) for o in objects] == [
        ("a.aspec", "AS201", "error"), ("a.aspec", "AS103", "error"), ("b.aspec", "AS402", "warning"),
    ]  # fmt: skip
    assert objects[0]["span"] == {"line": 1, "column": 14, "end_line": 1, "end_column": 18}
    assert objects[0]["help"] == "lora takes r, scale, alpha, rslora, dropout, init, lr_scale, loraplus, weight_decay"
    assert objects[0]["message"] == "unknown argument 'rank' for lora (did you mean 'r'?)"


def test_github_format_is_workflow_annotations(capsys, write):
    path = write("a,b.aspec", BAD + "defaults lora(r=2)\n")
    code, out, _ = lint(capsys, "--format", "github", path)
    assert code == 1
    first, second, third = out.splitlines()
    escaped = path.replace(",", "%2C")
    assert first == (
        f"::error file={escaped},line=1,col=14,endColumn=18,title=AS201::AS201 unknown argument "
        "'rank' for lora (did you mean 'r'?) (help: lora takes r, scale, alpha, rslora, dropout, init, lr_scale, loraplus, weight_decay)"
    )
    assert second.startswith(f"::error file={escaped},line=2,col=7,")
    assert third.startswith(f"::warning file={escaped},line=3,col=1,") and "title=AS404" in third


def test_github_format_escapes_newlines_and_percent():
    from adapterspec.language.diagnostics import Diagnostic, Severity, render_github

    line = render_github([Diagnostic("AS999", Severity.ERROR, "50% done\nnext", None, None, "a:b.aspec")])
    assert line == "::error file=a%3Ab.aspec,title=AS999::AS999 50%25 done%0Anext"


# --- hostile input never crashes or hangs ------------------------------------------------------


@pytest.mark.parametrize("name, content, code", [
    ("latin1.aspec", "q_proj: lora  # café\n".encode("latin-1"), "AS100"),
    ("binary.aspec", bytes(range(256)) * 4, "AS100"),
    ("empty.aspec", b"", "AS214"),
    ("huge.aspec", b"q_proj: lora\n" * 800_000, "AS105"),
    ("long-line.aspec", b"q_proj: lora(r=8)  # " + b"x" * 100_000 + b"\n", "AS105"),
    ("long-selector.aspec", b"a" * 100_000 + b": lora\n", "AS105"),
    ("nested.aspec", b"<" * 3000 + b"q" + b">" * 3000 + b"_proj: lora\n", "AS105"),
    ("nested-short.aspec", b"<" * 1000 + b"q" + b">" * 1000 + b"_proj: lora\n", "AS107"),
    ("brackets.aspec", b"layers" + b"[" * 2000 + b": lora\n", "AS104"),
    ("utf16.aspec", "q_proj: lora\n".encode("utf-16"), "AS100"),
], ids=lambda value: value if isinstance(value, str) and value.endswith(".aspec") else "")  # fmt: skip
def test_hostile_input_ends_in_a_diagnostic(capsys, write, name, content, code):
    path = write(name, content)
    exit_code, out, err = lint(capsys, path)
    assert exit_code == 1
    assert f"{path}" in out and f" {code} " in out
    assert err == ""
    assert all(len(line) < 400 for line in out.splitlines())


def test_ten_megabyte_file_reports_its_size(capsys, write):
    _, out, _ = lint(capsys, write("big.aspec", b"#" * (10 << 20)))
    assert "AS105 file is too large (10,485,760 bytes" in out


def test_non_utf8_points_at_the_bad_byte(capsys, write):
    _, out, _ = lint(capsys, write("a.aspec", b"q: lora\nk: lora  # \xe9t\xe9\n"))
    assert "a.aspec:2:12: AS100 file is not valid UTF-8 (byte 0xe9 at offset 19)" in out


# --- --model -----------------------------------------------------------------------------------


def test_model_adds_the_plans_diagnostics(capsys, write):
    path = write("a.aspec", "layers[*].self_attn.q_proj: lora\nqq_proj: lora\n**.*norm: lora\n")
    code, out, _ = lint(capsys, path, "--model", LLAMA)
    assert code == 1
    assert f"{path}:2:1: AS301" in out and f"{path}:3:1: AS302" in out


def test_model_does_not_repeat_a_static_warning(capsys, write):
    code, out, _ = lint(capsys, write("a.aspec", "q_proj: lora\nq_proj: none\n"), "--model", LLAMA)
    assert code == 0 and out.count("AS401") == 1 and "line 2 ('q_proj') overrides it" in out


def test_model_warnings_fail_with_strict(capsys, write):
    path = write("a.aspec", "layers[*].self_attn.k_proj: lora(r=32)\n")
    assert lint(capsys, path, "--model", LLAMA)[0] == 0
    code, out, _ = lint(capsys, path, "--model", LLAMA, "--strict")
    assert code == 1 and "AS306 warning" in out


def test_model_with_a_clean_spec(capsys, write):
    assert lint(capsys, write("a.aspec", GOOD), "--model", LLAMA) == (0, "", "")


def test_model_is_not_consulted_for_specs_with_errors(capsys, write):
    code, out, _ = lint(capsys, write("a.aspec", "nothing_here: lora(rank=1)\n"), "--model", LLAMA)
    assert code == 1 and "AS201" in out and "AS301" not in out


def test_missing_model_directory_is_exit_2(capsys, write, tmp_path):
    code, _, err = lint(capsys, write("a.aspec", GOOD), "--model", str(tmp_path / "nope"))
    assert code == 2 and "no such directory" in err and "Traceback" not in err


# --- the real program --------------------------------------------------------------------------


def test_console_program_exit_codes(write):
    command = [sys.executable, "-m", "adapterspec", "lint"]
    good = subprocess.run(command + [write("a.aspec", GOOD)], capture_output=True, text=True, cwd=ROOT)
    bad = subprocess.run(command + [write("b.aspec", BAD)], capture_output=True, text=True, cwd=ROOT)
    missing = subprocess.run(command + ["/nonexistent/x.aspec"], capture_output=True, text=True, cwd=ROOT)
    assert (good.returncode, good.stdout, good.stderr) == (0, "", "")
    assert bad.returncode == 1 and "AS201" in bad.stdout
    assert missing.returncode == 2 and "no such file" in missing.stderr and "Traceback" not in missing.stderr


# --- Python API --------------------------------------------------------------------------------


def test_api_names():
    assert adapterspec.parse_spec("q: lora").rules[0].transform.kind == "lora"
    assert [d.code for d in adapterspec.lint_text(BAD, filename="x.aspec")] == ["AS201", "AS103"]
    assert adapterspec.lint_text(BAD, filename="x.aspec")[0].filename == "x.aspec"
    assert issubclass(adapterspec.SpecError, Exception)


def test_load_spec(write):
    spec = adapterspec.load_spec(write("a.aspec", GOOD))
    assert spec.filename.endswith("a.aspec") and len(spec.rules) == 1
    with pytest.raises(adapterspec.SpecError) as error:
        adapterspec.load_spec(write("b.aspec", BAD))
    assert [d.code for d in error.value.diagnostics] == ["AS201", "AS103"]
    with pytest.raises(adapterspec.SpecError) as error:
        adapterspec.load_spec(write("c.aspec", b"\xff\xfe"))
    assert error.value.diagnostics[0].code == "AS100"


def test_parse_spec_accepts_a_leading_bom():
    assert len(adapterspec.parse_spec("\ufeffq: lora\n").rules) == 1
