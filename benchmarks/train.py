"""Benchmark `adapterspec train` against mlx_lm.lora's training on the same model, data and LoRA placement.

Both sides train LoRA (r=8, scale=20) on q_proj and v_proj of every block; mlx-lm through its
`train_model` (what `mlx_lm.lora --train` runs: `linear_to_lora_layers` + `train()`), adapterspec
through `adapterspec.train.run.run` (what `adapterspec train` runs) with the equivalent spec. Every run
is a fresh process; runs alternate in the order A B B A … so that drifting machine load hits both.
Throughput is trained tokens / training-step time (evaluation and saving excluded) after the
first report window (which holds compilation); the best run of each side is the one least
disturbed by other load, and the median is shown beside it.

    python benchmarks/train.py                                 # tiny-llama, examples/data
    python benchmarks/train.py --hidden 256 --layers 4 --iters 100 --rounds 3 --json train.json
"""

import argparse
import contextlib
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPEC = "adapterspec 1\nself_attn.<q_proj,v_proj>: lora(r=8, scale=20, dropout=0)\n"
KEYS = ["self_attn.q_proj", "self_attn.v_proj"]
SIDES = ("mlx_lm.lora", "adapterspec train")


class Collect:
    """An mlx-lm TrainingCallback keeping the train reports."""

    def __init__(self):
        self.reports = []

    def on_train_loss_report(self, info):
        self.reports.append(info)

    def on_val_loss_report(self, info):
        pass


def throughput(reports: list[dict]) -> tuple[float, float]:
    """(tokens/s over all report windows, tokens/s without the first window, which holds compilation)."""
    windows, before = [], 0
    for info in reports:
        tokens = info["trained_tokens"] - before
        before = info["trained_tokens"]
        windows.append((tokens, tokens / info["tokens_per_second"]))
    every = sum(t for t, _ in windows) / sum(s for _, s in windows)
    steady = windows[1:] or windows
    return every, sum(t for t, _ in steady) / sum(s for _, s in steady)


def run_mlx_lm(model_dir: Path, args, out: Path) -> dict:
    import mlx.core as mx
    import numpy as np
    from mlx_lm.lora import CONFIG_DEFAULTS, train_model
    from mlx_lm.tuner.datasets import load_dataset
    from mlx_lm.utils import load

    options = types.SimpleNamespace(
        **{
            **CONFIG_DEFAULTS,
            **common_options(args),
            "model": str(model_dir),
            "data": str(args.data),
            "train": True,
            "fine_tune_type": "lora",
            "num_layers": args.num_layers,
            "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": KEYS},
            "adapter_path": str(out),
        }
    )
    tic = time.perf_counter()
    model, tokenizer = load(str(model_dir))
    train_set, valid_set, _ = load_dataset(options, tokenizer)
    np.random.seed(args.seed)
    mx.random.seed(args.seed)
    collect = Collect()
    train_model(options, model, train_set, valid_set, collect)
    wall = time.perf_counter() - tic
    every, steady = throughput(collect.reports)
    return {
        "tokens_per_second": every,
        "steady_tokens_per_second": steady,
        "wall_seconds": wall,
        "final_train_loss": collect.reports[-1]["train_loss"],
    }


def run_adapterspec(model_dir: Path, args, out: Path, spec_path: Path) -> dict:
    import mlx_lm.tuner.datasets  # noqa: F401  (imported before the clock starts, as on the mlx-lm side)
    import mlx_lm.tuner.trainer  # noqa: F401
    import mlx_lm.utils  # noqa: F401

    from adapterspec.train.options import TrainOptions
    from adapterspec.train.run import run

    options = TrainOptions(
        **common_options(args),
        model=str(model_dir),
        spec=str(spec_path),
        data=str(args.data),
        adapter_path=str(out),
        force=True,
    )
    tic = time.perf_counter()
    result = run(options, stream=io.StringIO())
    wall = time.perf_counter() - tic
    every, steady = throughput(result.reports)
    return {
        "tokens_per_second": every,
        "steady_tokens_per_second": steady,
        "wall_seconds": wall,
        "final_train_loss": result.train_losses[-1][1],
    }


def common_options(args) -> dict:
    return {
        "iters": args.iters,
        "batch_size": args.batch_size,
        "learning_rate": 1e-4,
        "steps_per_report": args.steps_per_report,
        "steps_per_eval": 10**9,
        "val_batches": 1,
        "save_every": 10**9,
        "max_seq_length": 2048,
        "seed": args.seed,
    }


def model_directory(args, tmp: Path) -> Path:
    """The committed tiny-llama, or a llama of the asked size written into tmp."""
    if args.hidden is None and args.layers is None:
        return ROOT / "examples" / "models" / "tiny-llama"
    sys.path.insert(0, str(ROOT / "tests"))
    from models import write

    hidden = args.hidden or 64
    overrides = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": args.layers or 4}
    return write(tmp / "model", "llama", **overrides)


def worker(args) -> int:
    """One run of one side in this process; prints its figures as JSON."""
    tmp = Path(args.out)
    model_dir = Path(args.model)
    import mlx_lm.tokenizer_utils  # noqa: F401  (transformers is imported before either side's clock starts)

    args.num_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    with contextlib.redirect_stdout(io.StringIO()):
        if args.worker == "mlx_lm.lora":
            figures = run_mlx_lm(model_dir, args, tmp / "out")
        else:
            spec_path = tmp / "attention.aspec"
            spec_path.write_text(SPEC)
            figures = run_adapterspec(model_dir, args, tmp / "out", spec_path)
    print(json.dumps(figures))
    return 0


def spawn(side: str, model_dir: Path, args, tmp: Path) -> dict:
    out = Path(tempfile.mkdtemp(dir=tmp))
    command = [
        sys.executable,
        __file__,
        "--worker",
        side,
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--data",
        str(args.data),
        "--iters",
        str(args.iters),
        "--batch-size",
        str(args.batch_size),
        "--steps-per-report",
        str(args.steps_per_report),
        "--seed",
        str(args.seed),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{side} run failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "examples" / "data")
    parser.add_argument("--hidden", type=int, help="build a llama of this width instead of tiny-llama (64)")
    parser.add_argument("--layers", type=int, help="its number of blocks (default 4)")
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps-per-report", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4, help="runs of each side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    import mlx.core as mx

    with tempfile.TemporaryDirectory(prefix="adapterspec-bench-") as tmp:
        tmp = Path(tmp)
        model_dir = model_directory(args, tmp)
        args.num_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
        runs = {side: [] for side in SIDES}
        for round_ in range(args.rounds):
            for side in SIDES if round_ % 2 == 0 else SIDES[::-1]:
                runs[side].append(spawn(side, model_dir, args, tmp))
                print(
                    f"round {round_ + 1}: {side:<18} {runs[side][-1]['steady_tokens_per_second']:8,.0f} tok/s",
                    file=sys.stderr,
                )
    key = "steady_tokens_per_second"
    summary = {
        side: {
            "best_tokens_per_second": max(r[key] for r in results),
            **{k: statistics.median(r[k] for r in results) for k in results[0]},
        }
        for side, results in runs.items()
    }
    ratio = summary["adapterspec train"]["best_tokens_per_second"] / summary["mlx_lm.lora"]["best_tokens_per_second"]
    median_ratio = summary["adapterspec train"][key] / summary["mlx_lm.lora"][key]
    print(
        f"model {model_dir.name if args.hidden is None and args.layers is None else f'llama hidden {args.hidden or 64}'} "
        f"({args.num_layers} blocks), {args.iters} iterations of batch {args.batch_size}, LoRA r=8 on q_proj, v_proj; "
        f"{mx.default_device()}; {args.rounds} runs each"
    )
    print(f"{'':<18} {'best tok/s':>10} {'median':>8} {'wall s':>7} {'last loss':>10}")
    for side, values in summary.items():
        print(
            f"{side:<18} {values['best_tokens_per_second']:10,.0f} {values[key]:8,.0f} "
            f"{values['wall_seconds']:7.1f} {values['final_train_loss']:10.3f}"
        )
    print(f"adapterspec / mlx-lm: best {ratio:.3f}, median {median_ratio:.3f}")
    if args.json:
        args.json.write_text(
            json.dumps({"summary": summary, "runs": runs, "ratio_best": ratio, "ratio_median": median_ratio}, indent=2)
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
