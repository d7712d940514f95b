"""Benchmark `adapterspec train` against mlx_lm.lora's training on the same model, data and LoRA placement.

Both sides train LoRA (r=8, scale=20) on q_proj and v_proj of every block (with --all-linears on
all seven linears); mlx-lm through its
`train_model` (what `mlx_lm.lora --train` runs: `linear_to_lora_layers` + `train()`), adapterspec
through `adapterspec.train.run.run` (what `adapterspec train` runs) with the equivalent spec. Every run
is a fresh process; runs alternate in the order A B B A … so that drifting machine load hits both.
Throughput is trained tokens / training-step time (evaluation and saving excluded) after the
first report window (which holds compilation); the best run of each side is the one least
disturbed by other load, and the median is shown beside it. Time to the first step: from the start
of the side's run (model loading included) to the end of its first training step (the first report's
arrival, less the later steps of its window at the steady step time). On a CUDA GPU MLX builds the kernels a step
needs at its first use and keeps them in a cache on disk; each run starts with an empty cache of its own (unless
--shared-kernel-cache), so that no side's first step is shortened by kernels the other built.

    python benchmarks/train.py                                 # tiny-llama, examples/data
    python benchmarks/train.py --hidden 256 --layers 4 --iters 100 --rounds 3 --json train.json
    python benchmarks/train.py --preset gpu --rounds 1         # 8 x 4096 bf16 llama, all seven linears,
                                                               # batch 4 of 1024-token sequences
"""

import argparse
import contextlib
import io
import json
import os
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
ALL_SPEC = (
    "adapterspec 1\nself_attn.<q_proj,k_proj,v_proj,o_proj>: lora(r=8, scale=20, dropout=0)\n"
    "mlp.<gate_proj,up_proj,down_proj>: lora(r=8, scale=20, dropout=0)\n"
)
ALL_KEYS = [f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")
]
SIDES = ("mlx_lm.lora", "adapterspec train")
PRESETS = {
    "gpu": dict(
        hidden=4096,
        layers=8,
        intermediate=11008,
        heads=32,
        kv_heads=8,
        vocab=32000,
        dtype="bfloat16",
        seq_len=1024,
        batch_size=4,
        iters=40,
        steps_per_report=10,
        all_linears=True,
    )
}
WORDS = "the quick brown fox jumps over a lazy dog plan spec adapter model layer rank scale count from to".split()


class Collect:
    """An mlx-lm TrainingCallback keeping the train reports and when each arrived."""

    def __init__(self):
        self.reports = []
        self.arrivals = []

    def on_train_loss_report(self, info):
        self.reports.append(info)
        self.arrivals.append(time.perf_counter())

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


def first_step_seconds(collect: Collect, tic: float) -> float:
    """Start of the run to the end of its first step: the first report's arrival less the later steps of its
    window, each at the steady step time (the windows after the first)."""
    reports = collect.reports
    steps = [info["iteration"] - (reports[i - 1]["iteration"] if i else 0) for i, info in enumerate(reports)]
    seconds, before = [], 0
    for info in reports:
        tokens = info["trained_tokens"] - before
        before = info["trained_tokens"]
        seconds.append(tokens / info["tokens_per_second"])
    steady = sum(seconds[1:]) / sum(steps[1:]) if len(reports) > 1 else seconds[0] / steps[0]
    return collect.arrivals[0] - tic - (steps[0] - 1) * steady


def peak_gb() -> float:
    import mlx.core as mx

    return mx.get_peak_memory() / 1e9


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
            "lora_parameters": {
                "rank": 8,
                "scale": 20.0,
                "dropout": 0.0,
                "keys": ALL_KEYS if args.all_linears else KEYS,
            },
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
        "first_step_seconds": first_step_seconds(collect, tic),
        "peak_gb": peak_gb(),
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
    collect = Collect()
    tic = time.perf_counter()
    result = run(options, stream=io.StringIO(), training_callback=collect)
    wall = time.perf_counter() - tic
    every, steady = throughput(result.reports)
    return {
        "tokens_per_second": every,
        "steady_tokens_per_second": steady,
        "wall_seconds": wall,
        "first_step_seconds": first_step_seconds(collect, tic),
        "peak_gb": peak_gb(),
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
        "max_seq_length": args.seq_len or 2048,
        "seed": args.seed,
    }


def model_directory(args, tmp: Path) -> Path:
    """The committed tiny-llama, or a llama of the asked size (random weights) written into tmp."""
    if args.hidden is None and args.layers is None:
        return ROOT / "examples" / "models" / "tiny-llama"
    sys.path.insert(0, str(ROOT / "tests"))
    from models import builder

    hidden = args.hidden or 64
    overrides = {
        "hidden_size": hidden,
        "intermediate_size": args.intermediate or 2 * hidden,
        "num_hidden_layers": args.layers or 4,
    }
    if args.heads:
        overrides.update(num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads)
    if args.vocab:
        overrides["vocab_size"] = args.vocab
    model, config = builder.build_model(builder.tiny_config("llama", **overrides), dtype=args.dtype)
    path = builder.save_model_dir(model, config, tmp / "model", with_tokenizer=False)
    builder.write_tokenizer(path)  # the example tokenizer: its ids are all below any vocab_size here
    return path


def data_directory(args, tmp: Path) -> Path:
    """--data, or (with --seq-len) plain-text examples of random words, each longer than seq_len tokens."""
    if not args.seq_len:
        return args.data
    import random

    rng = random.Random(args.seed)
    path = tmp / "data"
    path.mkdir(exist_ok=True)
    for name, count in (("train", 4 * args.batch_size * args.iters), ("valid", 2 * args.batch_size), ("test", 4)):
        lines = [
            json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(2 * args.seq_len))}) for _ in range(count)
        ]
        (path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return path


def worker(args) -> int:
    """One run of one side in this process; prints its figures as JSON."""
    tmp = Path(args.out)
    model_dir = Path(args.model)
    import mlx_lm.tokenizer_utils  # noqa: F401  (transformers is imported before either side's clock starts)

    args.num_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    if args.memory_limit_gb:  # the same limit for both sides (adapterspec train's --memory-limit sets this too)
        import mlx.core as mx

        mx.set_memory_limit(int(args.memory_limit_gb * 1e9))
    with contextlib.redirect_stdout(io.StringIO()):
        if args.worker == "mlx_lm.lora":
            figures = run_mlx_lm(model_dir, args, tmp / "out")
        else:
            spec_path = tmp / "lora.aspec"
            spec_path.write_text(ALL_SPEC if args.all_linears else SPEC)
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
        "--seq-len",
        str(args.seq_len or 0),
    ] + (["--all-linears"] if args.all_linears else [])
    if args.memory_limit_gb:
        command += ["--memory-limit-gb", str(args.memory_limit_gb)]
    env = dict(os.environ)
    if not args.shared_kernel_cache:  # every run builds the GPU kernels it needs: its first step is a cold start
        env["MLX_PTX_CACHE_DIR"] = tempfile.mkdtemp(dir=tmp)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{side} run failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), help="the issue's GPU configuration")
    parser.add_argument("--data", type=Path, default=ROOT / "examples" / "data")
    parser.add_argument("--hidden", type=int, help="build a llama of this width instead of tiny-llama (64)")
    parser.add_argument("--layers", type=int, help="its number of blocks (default 4)")
    parser.add_argument("--intermediate", type=int, help="its MLP width (default 2 x hidden)")
    parser.add_argument("--heads", type=int, help="its attention heads (default the tiny llama's)")
    parser.add_argument("--kv-heads", type=int, help="its key/value heads")
    parser.add_argument("--vocab", type=int, help="its vocabulary size")
    parser.add_argument("--dtype", default="float32", help="its weights' dtype")
    parser.add_argument("--seq-len", type=int, default=0, help="train on generated texts cut to this many tokens")
    parser.add_argument("--all-linears", action="store_true", help="LoRA on all seven linears, not q/v only")
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps-per-report", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4, help="runs of each side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-limit-gb", type=float, help="MLX's memory limit in both sides' processes")
    parser.add_argument(
        "--shared-kernel-cache", action="store_true",
        help="let the runs share MLX's cache of built GPU kernels (default: each run starts with an empty one)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.preset:
        explicit = {a.lstrip("-").split("=")[0].replace("-", "_") for a in (argv or sys.argv[1:]) if a.startswith("--")}
        for name, value in PRESETS[args.preset].items():
            if name not in explicit:
                setattr(args, name, value)
    if args.worker:
        return worker(args)
    import mlx.core as mx

    with tempfile.TemporaryDirectory(prefix="adapterspec-bench-") as tmp:
        tmp = Path(tmp)
        model_dir = model_directory(args, tmp)
        args.data = data_directory(args, tmp)
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
    model_name = model_dir.name if args.hidden is None and args.layers is None else f"llama hidden {args.hidden or 64}"
    linears = "all seven linears" if args.all_linears else "q_proj, v_proj"
    tokens = f", sequences cut to {args.seq_len} tokens" if args.seq_len else ""
    print(
        f"model {model_name} ({args.num_layers} blocks, {args.dtype}), {args.iters} iterations of batch {args.batch_size}"
        f"{tokens}, LoRA r=8 on {linears}; {mx.default_device()}; {args.rounds} runs each"
    )
    print(
        f"{'':<18} {'best tok/s':>10} {'median':>8} {'first step s':>13} {'peak GB':>8} {'wall s':>7} {'last loss':>10}"
    )
    for side, values in summary.items():
        print(
            f"{side:<18} {values['best_tokens_per_second']:10,.0f} {values[key]:8,.0f} "
            f"{values['first_step_seconds']:13.2f} {values['peak_gb']:8.2f} "
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
