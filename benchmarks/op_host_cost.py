"""Time what the host spends queuing one operation of each kind, in a compiled function as in a training step.

A compiled LoRA step at a thousand tokens waits on the host that queues its work (`layers.py`'s host time).
This counts what each kind of operation an adapted linear adds costs the host, views included (a reshape,
a transpose or a slice launches no kernel but still passes through the evaluation loop): a chain of `--ops`
operations of one kind is compiled, and the time until `mx.async_eval` returns, over the chain's length, is
its host cost per operation (median of `--rounds`); the time until the results are ready is printed beside it.

    python benchmarks/op_host_cost.py
    python benchmarks/op_host_cost.py --ops 400 --rows 1024 --json host.json
"""

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lowrank_ops import time_operation  # noqa: E402


def chains(rows: int, width: int, ops: int, dtype: mx.Dtype) -> dict:
    """name -> (function, inputs): `ops` operations of one kind, each on the last one's result."""
    key = iter(mx.random.split(mx.random.key(0), 8))
    x = mx.random.normal((rows, width), key=next(key)).astype(dtype)
    tall = mx.random.normal((rows + ops, width), key=next(key)).astype(dtype)
    narrow = [mx.random.normal((width, 8), key=k).astype(dtype) for k in mx.random.split(next(key), ops)]
    wide = [mx.random.normal((8, width), key=k).astype(dtype) for k in mx.random.split(next(key), ops)]
    masters = [mx.random.normal((width, 8), key=k) for k in mx.random.split(next(key), ops)]

    def reshape(x):
        for i in range(ops):
            x = x.reshape((-1, width) if i % 2 else (-1, 2 * width))
        return x

    def transpose(x):
        for _ in range(ops):
            x = x.T
        return x

    def slice_rows(x):
        for _ in range(ops):
            x = x[1:]
        return x

    def gemm(x, *a):  # z = x·A for `ops` narrow A's, each its own output
        return [x @ m for m in a]

    def addmm(x, *b):  # y = y + z·B, the low-rank product's second GEMM
        z = x[:, :8]
        for m in b:
            x = mx.addmm(x, z, m)
        return x

    def casts(*masters):  # float32 masters cast to the activation dtype, one kernel each (one kernel's code)
        return [m.astype(dtype) for m in masters]

    @mx.custom_function
    def identity(x):
        return x

    @identity.vjp
    def identity_vjp(primals, cotangents, outputs):
        return cotangents

    def adam(*state):  # Adam's update of `ops` parameters (p, g, m, v each), fused by compile into a kernel each
        updated = []
        for i in range(0, len(state), 4):
            p, g, m, v = state[i : i + 4]
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g.square()
            updated += [p - 1e-5 * m / (v.sqrt() + 1e-8), m, v]
        return updated

    def custom(x):
        for _ in range(ops):
            x = identity(x)
        return x

    return {
        "reshape": (reshape, (x,)),
        "transpose": (transpose, (x,)),
        "slice": (slice_rows, (tall,)),
        "custom function (identity)": (custom, (x,)),
        "cast (width × 8)": (casts, tuple(masters)),
        "Adam update (width × 8)": (adam, tuple(m for m in masters for _ in range(4))),
        "GEMM x·A (rows × width × 8)": (gemm, (x, *narrow)),
        "addmm y + z·B": (addmm, (x, *wide)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--ops", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    print(f"{mx.default_device()}, mlx {mx.__version__}; chains of {args.ops}, {args.rows} × {args.width} bfloat16")
    results = {}
    for name, (function, inputs) in chains(args.rows, args.width, args.ops, mx.bfloat16).items():
        total, host = time_operation(mx.compile(function), inputs, repeats=1, rounds=args.rounds)
        results[name] = {"host_us": host / args.ops, "total_us": total / args.ops}
        print(f"{name:30} host {results[name]['host_us']:6.2f} µs/op   done {results[name]['total_us']:6.2f} µs/op")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": args.rows, "width": args.width, "ops": args.ops, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
