"""Every case of tests/cli/bad_inputs.py, run through the CLI in a subprocess, checked by one checker.

For each case the checker asserts, and reports all of what fails at once:

1. no Python traceback in the output, and an exit within the case's timeout (60 s unless said);
2. the documented exit code (0 fine, 1 diagnostics with errors, 2 usage errors and unreadable inputs);
3. the message names the offending file (its path, its path in the workspace or its base name) or option;
4. every input is byte-identical afterwards (the whole workspace is hashed before and after);
5. after a failure nothing new exists anywhere in the workspace: no output, no hidden temporary
   directory or file beside the destination, and a pre-existing output directory is unchanged;
6. words a case forbids (injected rules) appear in no output and no written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import builders  # noqa: E402
from bad_inputs import CASES, Case, default_base  # noqa: E402

REPO = builders.REPO
TRACEBACK = "Traceback (most recent call last)"


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("ADAPTERSPEC_FUSE_WORKERS", None)
    env.update(extra or {})
    return env


def adapterspec(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "adapterspec", *argv],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="session", autouse=True)
def prepared_inputs(tmp_path_factory):
    """Adapter directories (adapterspec apply) and a PEFT directory (export peft), made once."""
    root = tmp_path_factory.mktemp("prepared")
    models = REPO / "examples" / "models"
    specs = REPO / "examples" / "specs"
    for name, model_name, spec_name in [
        ("llama", "tiny-llama", "attention.aspec"),
        ("moe", "tiny-moe", "moe.aspec"),
        ("4bit", "tiny-llama-4bit", "dora-4bit.aspec"),
    ]:
        out = root / f"adapters-{name}"
        done = adapterspec("apply", str(models / model_name), str(specs / spec_name), "-o", str(out), cwd=root)
        assert done.returncode == 0, done.stderr
        builders.PREPARED[f"adapters-{name}"] = out
    out = root / "peft-llama"
    done = adapterspec(
        "export", "peft", str(models / "tiny-llama"), str(root / "adapters-llama"), "-o", str(out), cwd=root
    )
    assert done.returncode == 0, done.stderr
    builders.PREPARED["peft-llama"] = out
    yield root


# ── the workspace before and after ──────────────────────────────────────────


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root (links not followed) -> its kind, and for files a sha256 of the bytes."""
    seen: dict[str, str] = {}

    def walk(directory: Path) -> None:
        for entry in os.scandir(directory):
            rel = os.path.relpath(entry.path, root)
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode):
                seen[rel] = "link -> " + os.readlink(entry.path)
            elif stat.S_ISDIR(mode):
                seen[rel] = "dir"
                walk(Path(entry.path))
            elif stat.S_ISREG(mode):
                with open(entry.path, "rb") as f:
                    seen[rel] = "file " + hashlib.file_digest(f, "sha256").hexdigest()
            else:
                seen[rel] = f"special {stat.S_IFMT(mode):o}"

    walk(root)
    return seen


def last_traceback(text: str) -> str:
    """'ExceptionType: message (at file.py:function)' of the last traceback in text."""
    block = text[text.rindex(TRACEBACK) :]
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', block)
    lines = [line for line in block.splitlines() if line and not line.startswith((" ", TRACEBACK))]
    error = lines[-1] if lines else "?"
    where = ""
    if frames:
        file, line, function = frames[-1]
        where = f" (at {Path(file).name}:{function}, line {line})"
        ours = [f for f in frames if f"{os.sep}adapterspec{os.sep}" in f[0]]
        if ours and ours[-1] != frames[-1]:
            file, line, function = ours[-1]
            where += f" (last adapterspec frame {Path(file).parent.name}/{Path(file).name}:{function}, line {line})"
    return f"{error[:300]}{where}"


def name_forms(name: str, paths: dict[str, str], ws: Path) -> list[str]:
    if "{" not in name:
        return [name]
    full = name.format(**paths)
    forms = {full, os.path.basename(full.rstrip("/")) or full, os.path.realpath(full)}
    try:
        forms.add(os.path.relpath(full, ws))
    except ValueError:
        pass
    return sorted(f for f in forms if f and f != ".")


def named(output: str, wanted, paths: dict[str, str], ws: Path) -> bool:
    choices = wanted if isinstance(wanted, tuple) else (wanted,)
    return any(form in output for choice in choices for form in name_forms(choice, paths, ws))


# ── the checker ─────────────────────────────────────────────────────────────


def check(case: Case, ws: Path) -> list[str]:
    """Run one case; return its problems (empty: the case passes)."""
    paths = {
        "ws": str(ws),
        "model": str(ws / "model"),
        "spec": str(ws / "spec.aspec"),
        "adapters": str(ws / "adapters"),
        "peft": str(ws / "peft"),
        "data": str(ws / "data"),
        "out": str(ws / "out"),
        "outspec": str(ws / "out.aspec"),
        "yaml": str(ws / "lora.yaml"),
    }
    for step in case.base or default_base():
        step(ws)
    for step in case.steps:
        step(ws)
    before = snapshot(ws)
    argv = [arg.format(**paths) for arg in case.argv]
    env = cli_env({k: v.format(**paths) for k, v in case.env.items()})
    process = subprocess.Popen(
        [sys.executable, "-m", "adapterspec", *argv],
        cwd=ws,
        env=env,
        stdin=subprocess.PIPE if case.stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    hung = False
    try:
        out, err = process.communicate(input=case.stdin, timeout=case.timeout)
    except subprocess.TimeoutExpired:
        hung = True
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
    output = out.decode("utf-8", "replace") + err.decode("utf-8", "replace")
    rc = process.returncode
    after = snapshot(ws)

    problems: list[str] = []
    if hung:
        problems.append(f"hang: no exit within {case.timeout:g} s")
    if TRACEBACK in output:
        problems.append(f"traceback: {last_traceback(output)}")
    wanted = case.exit if isinstance(case.exit, tuple) else (case.exit,)
    if not hung and rc not in wanted:
        problems.append(f"exit code {rc}, documented {'/'.join(map(str, wanted))}")
    failed = hung or rc != 0
    if failed and not hung:
        for name in case.names:
            if not named(output, name, paths, ws):
                problems.append(f"message does not name {name if isinstance(name, str) else ' or '.join(name)}")
    changed = sorted(p for p in before if after.get(p) != before[p])
    if changed:
        problems.append(
            "input modified: " + ", ".join(f"{p} ({'removed' if p not in after else 'changed'})" for p in changed[:8])
        )
    if failed:
        new = sorted(p for p in after if p not in before)
        top = sorted({p.split(os.sep)[0] for p in new})
        if new:
            problems.append("left behind after the failure: " + ", ".join(top[:8]))
    for word in case.forbid:
        new_files = [ws / p for p in after if after[p].startswith("file") and after[p] != before.get(p)]
        texts = [output] + [f.read_bytes().decode("utf-8", "replace") for f in new_files]
        if any(word in text for text in texts):
            problems.append(f"injected text {word!r} appears in the output")
    if problems:
        tail = "\n".join(output.strip().splitlines()[-6:])
        shown = " ".join(repr(a) if (" " in a or "\n" in a) else a for a in argv)
        problems.append(f"argv: adapterspec {shown[:300]}")
        problems.append(f"rc={rc}; output tail:\n{tail[-1500:]}")
    return problems


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    if case.root_skip and os.geteuid() == 0:
        pytest.skip("permissions do not stop root")
    ws = tmp_path / "ws"
    ws.mkdir()
    started = time.monotonic()
    problems = check(case, ws)
    if os.environ.get("BAD_INPUTS_RESULTS"):  # one JSON line per case, for a report
        with open(os.environ["BAD_INPUTS_RESULTS"], "a", encoding="utf-8") as f:
            f.write(
                json.dumps({"id": case.id, "problems": problems, "seconds": round(time.monotonic() - started, 2)})
                + "\n"
            )
    assert not problems, f"{case.id}:\n  " + "\n  ".join(problems)
