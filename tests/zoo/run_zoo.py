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
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.zoo import zoo  # noqa: E402

COLUMNS = ("built", "index", "plan", "round_trip", "fuse", "q4_index", "q4_plan", "q4_round_trip")
MOE_WORDS = re.compile(r"(expert|router|gate$|switch|moe)", re.IGNORECASE)


def moe_roles(subject: zoo.Subject) -> dict:
    """Module path patterns (block numbers as *) of routed experts, shared experts and routers."""
    from tests.zoo.harness import ModuleIndex

    index = ModuleIndex.from_module(subject.load())
    roles: dict[str, dict[str, str]] = {"routed": {}, "shared": {}, "router": {}}
    experts = {i.num_experts for i in index if i.num_experts}
    for info in index:
        pattern = re.sub(r"\.\d+(?=\.|$)", ".*", info.path)
        name = info.path.rsplit(".", 1)[-1]
        described = f"{info.cls} {info.family} in={info.input_dims} out={info.output_dims}" + (
            f" experts={info.num_experts}" if info.num_experts else ""
        )
        if "shared" in info.path and info.family in zoo.ADAPTABLE:
            roles["shared"][pattern] = described
        elif info.family == "switch" or (".experts." in info.path and info.family in zoo.ADAPTABLE):
            roles["routed"][pattern] = described
        elif re.search(r"(router|^gate$|^gate_inp|^wg$|^w_gate$|^gate_proj_router)", name) and info.family != "list":
            roles["router"][pattern] = described
        elif info.family == "linear" and experts and info.output_dims in experts and re.search("gate|rout", name):
            roles["router"][pattern] = described + " (out = number of experts)"
    is_moe = bool(roles["routed"]) or bool(experts)
    return roles if is_moe else {}


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
            row[name], row["details"][name] = _run(check, subject)
        try:
            row["moe"] = moe_roles(subject)
        except Exception as e:  # noqa: BLE001
            row["moe"] = {"error": f"{type(e).__name__}: {e}"}
    if arch in zoo.QUANTIZED:
        q = zoo.Subject(arch, configs[arch], root, zoo.Q4)
        qbuilt = q.built()
        for name in zoo.QUANTIZED_CHECKS:
            if qbuilt.ok:
                row[f"q4_{name}"], row["details"][f"q4_{name}"] = _run(zoo.CHECKS[name], q)
            else:
                row[f"q4_{name}"], row["details"][f"q4_{name}"] = False, f"not built: {qbuilt.detail}"
    row["seconds"] = round(time.perf_counter() - started, 2)
    return row


def _run(check, subject) -> tuple[bool, str]:
    try:
        result = check(subject)
        return result.ok, result.detail
    except Exception as e:  # noqa: BLE001
        return False, f"{type(e).__name__}: {str(e)[:300]}"


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
    print(json.dumps(result["summary"]))
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
