"""Run every zoo check on every architecture and print a table, then JSON.

    python tests/zoo/run_zoo.py                 # all architectures
    python tests/zoo/run_zoo.py llama gpt2      # some
    python tests/zoo/run_zoo.py --fast          # the default test subset
    python tests/zoo/run_zoo.py --json out.json # also write the JSON to a file

Each architecture runs in a child process of its own (a crash or a hang costs one row, not the run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.zoo import zoo  # noqa: E402

COLUMNS = (
    "built",
    "index",
    "plan",
    "round_trip",
    "fuse",
    "roles",
    "mlx_lm_dirs",
    "q4_index",
    "q4_plan",
    "q4_round_trip",
)


def run_one(arch: str, root: Path) -> dict:
    configs = zoo.load_configs()
    row: dict = {"arch": arch, "details": {}}
    started = time.perf_counter()
    subject = zoo.Subject(arch, configs[arch], root)
    built = subject.built()
    row["built"] = built.ok
    if not built.ok:
        row["details"]["built"] = built.detail
    else:
        for name, check in zoo.CHECKS.items():
            row[name], row["details"][name], data = _run(check, subject)
            if name == "roles" and data.get("moe"):
                row["moe_roles"] = data["roles"]  # role filter → module patterns, for the MoE table
    if arch in zoo.QUANTIZED:
        q = zoo.Subject(arch, configs[arch], root, zoo.Q4)
        qbuilt = q.built()
        for name in zoo.QUANTIZED_CHECKS:
            if qbuilt.ok:
                row[f"q4_{name}"], row["details"][f"q4_{name}"], _ = _run(zoo.CHECKS[name], q)
            else:
                row[f"q4_{name}"], row["details"][f"q4_{name}"] = False, f"not built: {qbuilt.detail}"
    row["seconds"] = round(time.perf_counter() - started, 2)
    return row


def _run(check, subject) -> tuple[bool, str, dict]:
    try:
        result = check(subject)
        return result.ok, result.detail, result.data
    except Exception as e:  # noqa: BLE001
        return False, f"{type(e).__name__}: {str(e)[:300]}", {}


def _child(arch: str, root: Path, timeout: float) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--one", arch, "--root", str(root)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"arch": arch, "built": None, "details": {"run": f"timed out after {timeout:.0f} s"}}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"arch": arch, "built": None, "details": {"run": f"exit {done.returncode}: {' / '.join(tail)}"}}


def _mark(value) -> str:
    return {True: "ok", False: "FAIL", None: "-"}.get(value, "?")


def table(rows: list[dict]) -> str:
    lines = [" | ".join(["arch".ljust(22), *(c.ljust(6) for c in COLUMNS)])]
    for row in rows:
        cells = []
        for column in COLUMNS:
            if column.startswith("q4_") and column not in row:
                cells.append("".ljust(6))
            elif column != "built" and row.get("built") is not True and not column.startswith("q4_"):
                cells.append("-".ljust(6))
            else:
                cells.append(_mark(row.get(column)).ljust(6))
        lines.append(" | ".join([row["arch"].ljust(22), *cells]))
    return "\n".join(lines)


def roles_table(rows: list[dict]) -> str:
    """Markdown: per mixture-of-experts architecture, what each role filter selects (block numbers as *)."""
    shown = ("experts", "shared_expert", "router")
    lines = ["| arch | " + " | ".join(f"@{r}" for r in shown) + " |", "|" + " --- |" * (len(shown) + 1)]
    for row in rows:
        found = row.get("moe_roles")
        if found:
            cells = [", ".join(f"`{p.split('.*.', 1)[-1]}`" for p in found.get(r, [])) or "—" for r in shown]
            lines.append(f"| {row['arch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict:
    counts = {"architectures": len(rows), "built": sum(r.get("built") is True for r in rows)}
    for column in COLUMNS[1:]:
        ran = [r for r in rows if column in r]
        counts[column] = f"{sum(r[column] is True for r in ran)}/{len(ran)}"
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="*")
    parser.add_argument("--fast", action="store_true", help="only the fast subset")
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per architecture")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.root)))
        return 0
    archs = args.archs or (list(zoo.FAST) if args.fast else list(zoo.load_configs()))
    root = zoo.temp_root()
    rows, started = [], time.perf_counter()
    for arch in archs:
        row = _child(arch, root, args.timeout)
        rows.append(row)
        print(
            f"{arch}: " + " ".join(f"{c}={_mark(row.get(c))}" for c in COLUMNS if c in row), file=sys.stderr, flush=True
        )
    result = {"summary": summary(rows), "seconds": round(time.perf_counter() - started, 1), "rows": rows}
    print(table(rows))
    print()
    print(roles_table(rows))
    print(json.dumps(result["summary"]))
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
