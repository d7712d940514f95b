"""Where a training loop's step time goes: the layer benchmark's step against the step `adapterspec train` and
`mlx_lm.lora` run, on one model in one process.

`benchmarks/layers.py` times a compiled step as one call waited for on its own, on inputs of the batch's length;
the trainers run mlx-lm's `default_loss` on mlx-lm's batches, whose inputs are one token shorter than the batch
(1023 at max_seq_length 1024: MLX's CUDA backend differentiates attention with cuDNN's fused kernel only at a
multiple of 128 tokens), and wait for every step before building the next. This script times, for the frozen
floor, mlx-lm's layers and adapterspec's, the same compiled step five ways:

* `bench`: layers.py's loss on N inputs, each call waited for on its own;
* `loop`: mlx-lm's loss on an N-token batch (N - 1 inputs), each step evaluated before the next is built;
* `padded`: the same batch padded by `adapterspec train`'s ADAPTERSPEC_TRAIN_PAD_ATTENTION=128 (N inputs);
* `ahead`, `padded ahead`: those two, the next step built and queued while the device runs the last one.

    python benchmarks/train_step.py --preset gpu             # the 8-block 4096-wide llama, batch 4 x 1024
    python benchmarks/train_step.py --preset gpu --tokens 1x1024,4x1024,8x1024
    python benchmarks/train_step.py --layers 2 --hidden 128  # a small CPU check
"""

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

sys.path.insert(0, str(Path(__file__).resolve().parent))

import layers as bench  # noqa: E402

from adapterspec.train.data import padded_for_attention  # noqa: E402

PRESET = dict(layers=8, hidden=4096, intermediate=11008, heads=32, kv_heads=8, vocab=32000, tokens="4x1024")


def mlx_lm_loss():
    from mlx_lm.tuner.trainer import default_loss

    return default_loss


def compiled_step(model: nn.Module, loss):
    """mlx-lm trainer's compiled step (value_and_grad, Adam update) returning the loss and its token count."""
    value_and_grad = nn.value_and_grad(model, loss)
    optimizer = optim.Adam(learning_rate=1e-5)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(*batch):
        (value, tokens), grad = value_and_grad(model, *batch)
        optimizer.update(model, grad)
        return value, tokens

    return step, state


def bench_loss(model, inputs, targets):
    return bench.loss_fn(model, inputs, targets), mx.array(targets.size)


def time_bench(step, state, inputs, targets, warmup: int, iters: int) -> tuple[float, float]:
    for _ in range(warmup):
        mx.eval(step(inputs, targets), state)
    times, queued = [], []
    for _ in range(iters):
        mx.synchronize()
        start = time.perf_counter()
        mx.async_eval(step(inputs, targets), state)
        queued.append(time.perf_counter() - start)
        mx.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times), 1000 * statistics.median(queued)


def time_loop(step, state, batch, warmup: int, iters: int, ahead: bool) -> tuple[float, float]:
    """Mean step time over `iters` steps run as the trainers run them (or one step ahead), and the host's median
    time to queue a step."""
    for _ in range(warmup):
        mx.eval(step(*batch), state)
    mx.synchronize()
    queued, before = [], None
    start = time.perf_counter()
    for _ in range(iters):
        tic = time.perf_counter()
        value, tokens = step(*batch)
        mx.async_eval(state, value, tokens)
        queued.append(time.perf_counter() - tic)
        if not ahead:
            mx.eval(state, value, tokens)
        elif before is not None:
            mx.eval(before)
        before = value
    mx.synchronize()
    return 1000 * (time.perf_counter() - start) / iters, 1000 * statistics.median(queued)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["gpu"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--tokens", help="batch x sequence points, comma-separated (4x256; the preset's 4x1024)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.preset:
        for name, value in PRESET.items():
            if name != "tokens" or args.tokens is None:
                setattr(args, name, value)
    args.tokens = args.tokens or "4x256"
    args.intermediate = args.intermediate or 2 * args.hidden
    args.group_size = 64
    dtype = mx.bfloat16 if args.preset else mx.float32
    loss = mlx_lm_loss()
    print(f"mlx {mx.__version__} {mx.default_device()}; llama {args.layers}x{args.hidden}, tokens {args.tokens}")

    results = {}
    points = [tuple(int(n) for n in point.split("x")) for point in args.tokens.split(",")]
    for side in ("floor", "mlx-lm", "adapterspec"):
        model = bench.build_model("dense", args, dtype, args.layers)
        paths = bench.adapted_paths(model, "dense")
        if side == "floor":
            for layer in model.model.layers:
                layer.input_layernorm.unfreeze()
        elif side == "mlx-lm":
            bench.apply_mlxlm(model, paths, 8, 20.0)
        else:
            bench.apply_adapterspec(model, paths, 8, 20.0)
        model.train()
        for rows, seq in points:
            tokens = mx.random.randint(0, args.vocab, (rows, seq + 1))
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
            batch = (tokens[:, :seq], mx.array([[0, seq]] * rows))  # mlx-lm's batch: tokens and (offset, length)
            padded = padded_for_attention(*batch, 128)
            mx.eval(tokens, batch, padded)
            row = {}
            step, state = compiled_step(model, bench_loss)
            row["bench"] = time_bench(step, state, inputs, targets, args.warmup, args.iters)
            loops = {"loop": (batch, False), "padded": (padded, False), "ahead": (batch, True)}
            loops["padded ahead"] = (padded, True)
            for name, (trained, ahead) in loops.items():
                step, state = compiled_step(model, loss)
                row[name] = time_loop(step, state, trained, args.warmup, args.iters, ahead)
            results[f"{rows}x{seq} {side}"] = row
            print(f"{rows}x{seq} {side}", "  ".join(f"{k} {ms:.2f} ms (host {host:.2f})" for k, (ms, host) in row.items()),
                  flush=True)  # fmt: skip
            del step, state
        del model
        mx.clear_cache()

    for rows, seq in points:
        floor = results[f"{rows}x{seq} floor"]
        for side in ("mlx-lm", "adapterspec"):
            mine = results[f"{rows}x{seq} {side}"]
            print(f"{rows}x{seq} {side} × floor:", "  ".join(f"{k} {mine[k][0] / floor[k][0]:.3f}" for k in floor))
        print(f"{rows}x{seq} adapterspec / mlx-lm step time:", "  ".join(
            f"{k} {results[f'{rows}x{seq} adapterspec'][k][0] / results[f'{rows}x{seq} mlx-lm'][k][0]:.3f}"
            for k in floor))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": None}, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
