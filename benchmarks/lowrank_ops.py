"""Time each operation an adapted linear adds to a training step, one by one, beside the base's own GEMM.

A compiled LoRA step at few tokens is launch-bound: this shows which of the added kernels cost what, at
the shapes of an 8-block 4096-wide llama (q/o 4096 → 4096, k/v 4096 → 1024, gate/up 4096 → 11008), for
one adapter (rank r) and for three siblings sharing one product (rank 3r). Each operation runs `--repeats`
times in one evaluation (kernels queued back to back, as in a step); the median of `--rounds` is reported.

    python benchmarks/lowrank_ops.py                       # 1024, 4096 and 8192 rows
    python benchmarks/lowrank_ops.py --rows 1024 --json ops.json
"""

import argparse
import json
import statistics
import time

import mlx.core as mx


def operations(rows: int, d_in: int, d_out: int, r: int, dtype: mx.Dtype) -> dict:
    """name -> (function, inputs) for each operation of one adapted linear's step at these shapes."""
    key = iter(mx.random.split(mx.random.key(0), 16))

    def normal(*shape, dt=dtype):
        return mx.random.normal(shape, key=next(key)).astype(dt)

    x, dy = normal(rows, d_in), normal(rows, d_out)
    weight, out, dx = normal(d_out, d_in), normal(rows, d_out), normal(rows, d_in)
    a, b, z, dz = normal(d_in, r), normal(r, d_out), normal(rows, r), normal(rows, r)
    a32 = normal(d_in, r, dt=mx.float32)
    return {
        "base x·Wᵀ": (lambda x, w: x @ w.T, (x, weight)),
        "base dy·W": (lambda dy, w: dy @ w, (dy, weight)),
        "z = x·A": (lambda x, a: x @ a, (x, a)),
        "y = out + z·B": (lambda out, z, b: mx.addmm(out, z, b), (out, z, b)),
        "dz = dy·Bᵀ": (lambda dy, b: dy @ b.T, (dy, b)),
        "dx += dz·Aᵀ": (lambda dx, dz, a: mx.addmm(dx, dz, a.T), (dx, dz, a)),
        "dA = xᵀ·dz": (lambda x, dz: x.T @ dz, (x, dz)),
        "dB = zᵀ·dy": (lambda z, dy: z.T @ dy, (z, dy)),
        "cast A": (lambda a: a.astype(dtype), (a32,)),
        "cast dA": (lambda a: a.astype(mx.float32), (a,)),
        "add (rows × in)": (lambda p, q: p + q, (dx, x)),
    }


def time_operation(function, inputs, repeats: int, rounds: int) -> float:
    """Microseconds per call, `repeats` calls queued in one evaluation; median over rounds."""
    mx.eval(function(*inputs))
    samples = []
    for _ in range(rounds):
        mx.synchronize()
        start = time.perf_counter()
        mx.eval([function(*inputs) for _ in range(repeats)])
        mx.synchronize()
        samples.append((time.perf_counter() - start) / repeats * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1024,4096,8192", help="token counts (rows), comma-separated")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args()
    dtype = mx.bfloat16
    shapes = {"q/o": (4096, 4096), "k/v": (4096, 1024), "gate/up": (4096, 11008)}
    print(f"device {mx.default_device()}, mlx {mx.__version__}, bfloat16, µs per call")
    results = []
    for rows in (int(n) for n in args.rows.split(",")):
        for shape_name, (d_in, d_out) in shapes.items():
            for r in (args.rank, 3 * args.rank):
                for name, (function, inputs) in operations(rows, d_in, d_out, r, dtype).items():
                    if r != args.rank and name.startswith(("base", "add")):
                        continue
                    us = time_operation(function, inputs, args.repeats, args.rounds)
                    results.append(dict(rows=rows, shape=shape_name, d_in=d_in, d_out=d_out, r=r, op=name, us=us))
                    print(f"rows {rows:5d}  {shape_name:8s} r={r:<3d} {name:18s} {us:9.1f}")
                mx.clear_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(mx.default_device()), mlx=mx.__version__, results=results), f, indent=1)


if __name__ == "__main__":
    main()
