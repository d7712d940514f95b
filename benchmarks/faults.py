"""Faults at random moments: `fuse`, `apply` and `train` interrupted (SIGINT) or killed (SIGKILL) at a random
point of their run, many times, each trial checked for what a user must be able to rely on.

Run: python benchmarks/faults.py [--trials 20] [--commands fuse,apply,train] [--json FILE]

Per trial: an interrupt ends the command with exit 130 and nothing at the destination (or, when it came too
late, exit 0 and a complete output); a kill leaves nothing at the destination (or a complete output); the
inputs are byte-identical; the next run to the same destination succeeds and leaves no temporary entry
beside it; an interrupted or killed `train` continues with --resume from its newest checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "examples" / "models"
SPECS = ROOT / "examples" / "specs"
DATA = ROOT / "examples" / "data"


def cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "adapterspec", *argv]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def tree_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(item.relative_to(path)).encode())
        digest.update(item.read_bytes())
    return digest.hexdigest()


def commands(work: Path) -> dict[str, list[str]]:
    out = str(work / "out")
    adapters = str(work / "adapters")
    return {
        "fuse": cli("fuse", str(MODELS / "tiny-llama-4bit"), adapters, "-o", out, "--quiet"),
        "apply": cli("apply", str(MODELS / "tiny-moe"), str(SPECS / "moe.aspec"), "-o", out),
        "train": cli("train", str(MODELS / "tiny-llama"), str(SPECS / "attention.aspec"), "--data", str(DATA), "-o", out,
                     "--iters", "12", "--save-every", "3", "--steps-per-eval", "1000", "--val-batches", "1"),
    }  # fmt: skip


def leftovers(work: Path) -> list[str]:
    return sorted(p.name for p in work.iterdir() if p.name.startswith(".out."))


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env(), capture_output=True, text=True, timeout=600)


def trial(name: str, argv: list[str], work: Path, how: signal.Signals, delay: float, reference: str) -> list[str]:
    """One run signalled after `delay` seconds; the problems seen (empty: the trial passed)."""
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    inputs = {p: tree_hash(p) for p in (MODELS, SPECS, DATA, work / "adapters")}
    process = subprocess.Popen(argv, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    process.send_signal(how)
    _, err = process.communicate(timeout=600)
    problems = []
    finished = process.returncode == 0
    if "Traceback (most recent call last)" in err:
        problems.append("traceback: " + " | ".join(err[err.index("Traceback") :].strip().splitlines()[-12:])[:1500])
    # -2: the interrupt came before the interpreter could handle it (a shell reports 130 for both).
    if how is signal.SIGINT and process.returncode not in (0, 130, -signal.SIGINT):
        problems.append(f"exit {process.returncode} after SIGINT")
    published = out.exists() and (name == "train" or any(out.iterdir()))
    if name != "train" and published and tree_hash(out) != reference:
        problems.append(
            "an incomplete output was published" if not finished else "the output differs from a clean run's"
        )
    if any(tree_hash(p) != h for p, h in inputs.items()):
        problems.append("an input changed")
    if name == "train" and not finished and (out / "checkpoints").is_dir():
        again = run(argv + ["--resume"])
        if again.returncode != 0:
            problems.append(f"--resume failed: {again.stderr.strip().splitlines()[-1:]}")
    else:
        again = run(argv + (["--force"] if published else []))
        if again.returncode != 0:
            problems.append(f"the next run failed: {again.stderr.strip().splitlines()[-1:]}")
    if leftovers(work):
        problems.append(f"left beside the output: {leftovers(work)}")
    return problems


def clean_run(argv: list[str], work: Path) -> tuple[float, str]:
    """How long an undisturbed run takes, and the hash of what it writes (runs are deterministic)."""
    shutil.rmtree(work / "out", ignore_errors=True)
    started = time.monotonic()
    done = run(argv)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[3:6])} failed: {done.stderr[-800:]}")
    return time.monotonic() - started, tree_hash(work / "out")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="trials per command and signal (default 20)")
    parser.add_argument("--commands", default="fuse,apply,train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results as JSON to this file")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        prepared = run(
            cli("apply", str(MODELS / "tiny-llama-4bit"), str(SPECS / "dora-4bit.aspec"), "-o", str(work / "adapters"))
        )
        assert prepared.returncode == 0, prepared.stderr
        for name in args.commands.split(","):
            argv = commands(work)[name]
            seconds, reference = clean_run(argv, work)
            for how in (signal.SIGINT, signal.SIGKILL):
                failures = []
                for _ in range(args.trials):
                    delay = rng.uniform(0.0, seconds * 1.1)
                    problems = trial(name, argv, work, how, delay, reference)
                    if problems:
                        failures.append({"delay": round(delay, 2), "problems": problems})
                results.append({"command": name, "signal": how.name, "trials": args.trials, "seconds": round(seconds, 2),
                                "failed": len(failures), "failures": failures})  # fmt: skip
                print(f"{name:6} {how.name:8} {args.trials} trials over 0–{seconds * 1.1:.1f} s: "
                      f"{args.trials - len(failures)} ok, {len(failures)} failed", flush=True)  # fmt: skip
                for failure in failures[:5]:
                    print(f"    at {failure['delay']} s: {'; '.join(failure['problems'])}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 1 if any(r["failed"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
