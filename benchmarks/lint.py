"""Wall time of `adapterspec lint` on one file and on 1,000 files, next to `python -c "import lark, pydantic"`.

Run: python benchmarks/lint.py [--runs N]. Every number is the median of N runs of a fresh process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples" / "specs").glob("*.aspec"))
# What the installed console script runs.
CONSOLE_SCRIPT = "import sys; from adapterspec.cli import main; sys.exit(main())"
GOAL_ONE_FILE_RATIO = 1.5
GOAL_THOUSAND_FILES_S = 2.0


def median_wall(command: list[str], runs: int, env: dict[str, str]) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        times.append(time.perf_counter() - start)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command[:4])}… failed ({result.returncode}): {result.stderr.decode()[-500:]}")
    return statistics.median(times)


def thousand_files(directory: Path) -> list[str]:
    paths = []
    for number in range(1000):
        source = EXAMPLES[number % len(EXAMPLES)]
        path = directory / f"spec-{number:04d}.aspec"
        shutil.copyfile(source, path)
        paths.append(str(path))
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9, help="runs per measurement (default 9)")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    lint = [sys.executable, "-c", CONSOLE_SCRIPT, "lint"]
    one_file = str(ROOT / "examples" / "specs" / "mixed-ranks.aspec")
    # Warm the OS file cache and adapterspec's parser cache before measuring.
    subprocess.run(lint + [one_file], env=env, check=True)
    with tempfile.TemporaryDirectory() as directory:
        files = thousand_files(Path(directory))
        baseline = median_wall([sys.executable, "-c", "import lark, pydantic"], args.runs, env)
        empty = median_wall([sys.executable, "-c", "pass"], args.runs, env)
        single = median_wall(lint + [one_file], args.runs, env)
        many = median_wall(lint + files, max(3, args.runs // 2), env)
    print(f"python -c pass                       {empty * 1000:7.1f} ms")
    print(f"python -c 'import lark, pydantic'    {baseline * 1000:7.1f} ms  (baseline)")
    print(
        f"adapterspec lint (1 file)            {single * 1000:7.1f} ms  {single / baseline:5.2f}× baseline"
        f"  (goal ≤ {GOAL_ONE_FILE_RATIO}×)"
    )
    print(
        f"adapterspec lint (1,000 files)       {many * 1000:7.1f} ms  {many / baseline:5.2f}× baseline"
        f"  (goal < {GOAL_THOUSAND_FILES_S:.0f} s)"
    )
    met = single / baseline <= GOAL_ONE_FILE_RATIO and many < GOAL_THOUSAND_FILES_S
    print("goals met" if met else "goals NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
