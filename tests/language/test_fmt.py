"""`adapterspec fmt`: the canonical layout, comments kept, meaning kept, atomic writes, --check and --diff."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest

from adapterspec.cli import main
from adapterspec.language.format import format_source
from adapterspec.language.lint import lint_text

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "specs").glob("*.aspec"))

MESSY = (
    "\ufeff  # header   \r\n"
    "\r\n"
    "\r\n"
    "adapterspec   1\n"
    "defaults   lora( dropout=0.1 , r = 8 )   # defaults\n"
    "\n\n\n"
    "layers[ -4 : ].mlp.< gate , up >_proj@linear :lora(alpha=32,r=16,)#trailing\n"
    "\t# indented own-line\n"
    "layers[0,  5]:none\n"
    "/lm_head :  full\n"
    "\n\n"
)
MESSY_FORMATTED = (
    "# header\n"
    "\n"
    "adapterspec 1\n"
    "defaults lora(r=8, dropout=0.1)  # defaults\n"
    "\n"
    "layers[-4:].mlp.<gate,up>_proj@linear: lora(r=16, alpha=32)  #trailing\n"
    "# indented own-line\n"
    "layers[0,5]: none\n"
    "/lm_head: full\n"
)


def fmt(text: str) -> str:
    formatted, diagnostics = format_source(text, "t.aspec")
    assert diagnostics == [], [d.message for d in diagnostics]
    return formatted


# --- the layout --------------------------------------------------------------------------------


def test_messy_file_gets_the_canonical_layout():
    assert fmt(MESSY) == MESSY_FORMATTED


@pytest.mark.parametrize("written, canonical", [
    ("q_proj :lora", "q_proj: lora"),
    ("q_proj:lora()", "q_proj: lora()"),
    ("q:lora(dropout=0.1,rslora=true,alpha=2,scale=3,r=4)", "q: lora(r=4, scale=3, alpha=2, rslora=true, dropout=0.1)"),
    ("q: lora(zeta=1, r=2, alpha_=3)", "q: lora(r=2, zeta=1, alpha_=3)"),
    ("q: lora(r=8, r=9)", "q: lora(r=8, r=9)"),
    ("q: lora(scale=1e-1, r=+8)", "q: lora(r=+8, scale=1e-1)"),
    ("layers[ :: 2 ]: none", "layers[::2]: none"),
    ("layers[1:]:none", "layers[1:]: none"),
    ("layers[ * ]:none", "layers[*]: none"),
    ("< q , k >_proj: full", "<q,k>_proj: full"),
    ("**.*norm  :  full", "**.*norm: full"),
    ("defaults  dora(r=2)\nq: dora", "defaults dora(r=2)\nq: dora"),
    ("adapterspec 01\nq: lora", "adapterspec 1\nq: lora"),
    ("q: lora#c", "q: lora  #c"),
    ("q: lora      # c", "q: lora  # c"),
    ("   # c", "# c"),
    ("e: tokens( lr_scale=0.1 ,[ 3 , +4:7 ])", "e: tokens([3, 4:7], lr_scale=0.1)"),
    ("e: tokens(rows=[3,4])", "e: tokens([3, 4])"),
    ("q: lora(weight_decay=0, loraplus=16, lr_scale=2, init=pissa, r=4)",
     "q: lora(r=4, init=pissa, lr_scale=2, loraplus=16, weight_decay=0)"),
    ("n: full(weight_decay=0,lr_scale=0.5)", "n: full(lr_scale=0.5, weight_decay=0)"),
])  # fmt: skip
def test_canonical_spelling(written, canonical):
    assert fmt(written) == canonical + "\n"


def test_blank_lines_collapse_to_one_and_vanish_at_the_ends():
    assert fmt("\n\n\na: lora\n\n\n\nb: lora\nc: lora\n\n\n") == "a: lora\n\nb: lora\nc: lora\n"


def test_every_comment_stays_where_it_was():
    text = "# one\na: lora  # two\n\n# three\n#four\nb: none # five\n# six"
    assert fmt(text) == "# one\na: lora  # two\n\n# three\n#four\nb: none  # five\n# six\n"


def test_comment_contents_are_untouched():
    text = "#x: lora(r = 8)   \t\n#  two  spaces\nq: lora  #   keep   inner   spacing\n"
    assert fmt(text) == "#x: lora(r = 8)\n#  two  spaces\nq: lora  #   keep   inner   spacing\n"


def test_empty_and_comment_only_files():
    assert fmt("") == ""
    assert fmt("\n\n  \n") == ""
    assert fmt("# only\n") == "# only\n"


def test_version_line_is_never_moved():
    assert fmt("q: lora\nadapterspec 1\n") == "q: lora\nadapterspec 1\n"


def test_validation_errors_do_not_stop_formatting():
    assert fmt("q:lora(rank=8)\nk : lorra\n") == "q: lora(rank=8)\nk: lorra\n"


def test_syntax_errors_stop_formatting():
    formatted, diagnostics = format_source("ok : lora\nq_proj lora\n", "t.aspec")
    assert formatted is None and [(d.code, d.span.line) for d in diagnostics] == [("AS103", 2)]


# --- idempotent and meaning-preserving ---------------------------------------------------------


def meaning(text: str) -> list:
    return [(d.code, d.severity) for d in lint_text(text)]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_already_formatted(path):
    text = path.read_text(encoding="utf-8")
    assert fmt(text) == text


@pytest.mark.parametrize(
    "text",
    [
        MESSY,
        "q: lora(r=8, r=9)\nq:lora(r=8,r=9)\n",
        "q: lora\nq: lora\n",
        "defaults lora(alpha=4)\nq: lora(scale=1, alpha=2)\n",
    ],
)
def test_formatting_is_idempotent_and_keeps_diagnostic_codes(text):
    once = fmt(text)
    assert fmt(once) == once
    assert meaning(once) == meaning(text)


# --- the command -------------------------------------------------------------------------------


@pytest.fixture
def spec(tmp_path):
    def spec(content: str | bytes, name: str = "a.aspec") -> Path:
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return path

    return spec


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["fmt", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_fmt_rewrites_the_file(capsys, spec):
    path = spec(MESSY)
    code, out, err = run(capsys, str(path))
    assert (code, out) == (0, "")
    assert f"reformatted {path}" in err
    assert path.read_bytes() == MESSY_FORMATTED.encode("utf-8")


def test_fmt_never_touches_a_formatted_file(capsys, spec):
    path = spec(MESSY_FORMATTED)
    os.utime(path, (1_000_000, 1_000_000))
    before = path.stat()
    assert run(capsys, str(path)) == (0, "", "")
    after = path.stat()
    assert (after.st_mtime, after.st_ino) == (before.st_mtime, before.st_ino)


def test_fmt_writes_atomically_and_keeps_permissions(capsys, spec, monkeypatch):
    path = spec("q :lora\n")
    path.chmod(0o640)
    inode = path.stat().st_ino
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((a, b)), real_replace(a, b)))
    assert run(capsys, str(path))[0] == 0
    ((source, target),) = replaced
    assert Path(source).parent == path.parent and Path(target) == path.resolve()
    assert path.read_text() == "q: lora\n"
    assert path.stat().st_mode & 0o777 == 0o640
    assert path.stat().st_ino != inode
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.aspec"]


def test_failed_write_leaves_the_file_and_no_temporary(capsys, spec, monkeypatch):
    path = spec("q :lora\n")

    def fail(a, b):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    code, _, err = run(capsys, str(path))
    assert code == 2 and "cannot write (No space left on device)" in err
    assert path.read_text() == "q :lora\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.aspec"]


def test_fmt_through_a_symlink_rewrites_the_target(capsys, spec, tmp_path):
    target = spec("q :lora\n", "real.aspec")
    link = tmp_path / "link.aspec"
    link.symlink_to(target)
    assert run(capsys, str(link))[0] == 0
    assert link.is_symlink() and target.read_text() == "q: lora\n"


def test_check_reports_a_diff_and_exits_1_without_writing(capsys, spec):
    path = spec("q :lora\n\n\nk: none")
    code, out, _ = run(capsys, "--check", str(path))
    assert code == 1
    assert out == (
        f"--- {path} (original)\n"
        f"+++ {path} (formatted)\n"
        "@@ -1,4 +1,3 @@\n"
        "-q :lora\n"
        "+q: lora\n"
        " \n"
        "-\n"
        "-k: none\n"
        "\\ No newline at end of file\n"
        "+k: none\n"
    )
    assert path.read_text() == "q :lora\n\n\nk: none"


def test_check_passes_on_formatted_files(capsys):
    assert run(capsys, "--check", *map(str, EXAMPLES)) == (0, "", "")


def test_diff_prints_but_neither_writes_nor_fails(capsys, spec):
    path = spec("q :lora\n")
    code, out, _ = run(capsys, "--diff", str(path))
    assert code == 0 and "+q: lora" in out
    assert path.read_text() == "q :lora\n"


def test_fmt_refuses_a_file_with_syntax_errors(capsys, spec):
    bad, good = spec("q_proj lora\n", "bad.aspec"), spec("q :lora\n", "good.aspec")
    code, out, err = run(capsys, str(bad), str(good))
    assert code == 1 and out == ""
    assert f"{bad}:1:7: AS103 space inside a selector" in err
    assert "not formatted" in err
    assert bad.read_text() == "q_proj lora\n"
    assert good.read_text() == "q: lora\n"


def test_fmt_refuses_binary_and_non_utf8(capsys, spec):
    binary, latin = spec(b"\x00\x01", "bin.aspec"), spec("q: lora # é\n".encode("latin-1"), "latin.aspec")
    code, _, err = run(capsys, str(binary), str(latin))
    assert code == 1 and "AS100" in err
    assert binary.read_bytes() == b"\x00\x01"


def test_fmt_missing_file_is_exit_2(capsys, tmp_path):
    code, _, err = run(capsys, str(tmp_path / "nope.aspec"))
    assert code == 2 and "no such file" in err


def test_fmt_stdin_to_stdout(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"q :lora\n")))
    assert run(capsys, "-") == (0, "q: lora\n", "")


def test_fmt_directory(capsys, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.aspec").write_text("q :lora\n")
    (tmp_path / "b.txt").write_text("q :lora\n")
    assert run(capsys, str(tmp_path))[0] == 0
    assert (tmp_path / "sub" / "a.aspec").read_text() == "q: lora\n"
    assert (tmp_path / "b.txt").read_text() == "q :lora\n"
