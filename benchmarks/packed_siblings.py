"""Time sibling LoRA linears packed into one (`adapters.packed`, `lowrank.packed_linears`) against the shared path the layers take, and the floor.

One group of linears reading the same x (q/k/v: 4096 → 4096, 1024, 1024; gate/up: 4096 → 11008 twice), bfloat16,
rank r each, at several token counts: the frozen bases alone (their input's gradient only, as in a frozen
model), the layers' shared path (one x·[A…], then per linear its base GEMM with z·B added, `siblings`), and
the packed path (bases stacked, B's block-diagonal: three GEMMs forward, five backward, and a concatenation of
the outputs' gradients). Each is a compiled forward alone, or a compiled forward and backward (the outputs, as
a loss needs them, and the gradients of x, every A and B); `--repeats` calls queued in one evaluation; µs per
call and the host's µs until queued (the part of a small step the host sets), medians of `--rounds`.

    python benchmarks/packed_siblings.py
    python benchmarks/packed_siblings.py --rows 1024 --json packed.json
"""

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowrank_ops import time_operation  # noqa: E402

from adapterspec.adapters import lowrank, siblings  # noqa: E402

GROUPS = {"q/k/v": [4096, 1024, 1024], "gate/up": [11008, 11008]}


def variants(widths: list[int], d_in: int, r: int, scale: float, dtype: mx.Dtype) -> dict:
    """name -> function(x, *masters) giving every linear's output (the floor: function(x), its bases alone); the
    masters are the float32 A's then B's."""
    key = iter(mx.random.split(mx.random.key(1), 4 * len(widths) + 2))
    weights = [(0.02 * mx.random.normal((n, d_in), key=next(key))).astype(dtype) for n in widths]
    stacked = mx.concatenate(weights)
    mx.eval(weights, stacked)

    def floor(x):
        return [x @ w.T for w in weights]

    def shared(x, *masters):
        a, b = masters[: len(widths)], masters[len(widths) :]
        z = siblings.shared_product(x, list(a), dtype)
        return [
            lowrank.separate_with_product(x, zi, (scale * bi).astype(dtype), lowrank.DenseBase(w, None))
            for zi, bi, w in zip(z, b, weights)
        ]

    def packed_path(x, *masters):
        a, b = masters[: len(widths)], masters[len(widths) :]
        a_cat = mx.concatenate(a, axis=1).astype(dtype)
        return lowrank.packed_linears(x, a_cat, list(b), [scale] * len(widths), stacked, None)

    return {"floor": floor, "shared": shared, "packed": packed_path}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1024,4096,8192", help="token counts, comma-separated")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    dtype, d_in = mx.bfloat16, 4096
    print(f"{mx.default_device()}, mlx {mx.__version__}; bfloat16, r={args.rank}; µs per call (host µs until queued)")
    results = []
    for rows in (int(n) for n in args.rows.split(",")):
        for group, widths in GROUPS.items():
            key = iter(mx.random.split(mx.random.key(rows), 2 * len(widths) + 4))
            x = mx.random.normal((rows, d_in), key=next(key)).astype(dtype)
            cotangents = [mx.random.normal((rows, n), key=next(key)).astype(dtype) for n in widths]
            masters = [0.01 * mx.random.normal((d_in, args.rank), key=next(key)) for _ in widths]
            masters += [0.01 * mx.random.normal((args.rank, n), key=next(key)) for n in widths]
            mx.eval(x, cotangents, masters)
            line = []
            for name, function in variants(widths, d_in, args.rank, 2.0, dtype).items():
                params = [x] if name == "floor" else [x, *masters]
                for mode in ("forward", "step"):
                    if mode == "forward":
                        compiled = mx.compile(function)
                    else:
                        compiled = mx.compile(lambda cots, *p, function=function: mx.vjp(function, list(p), cots))
                    inputs = params if mode == "forward" else [cotangents, *params]
                    us, host = time_operation(compiled, inputs, args.repeats, args.rounds)
                    results.append(dict(rows=rows, group=group, variant=name, mode=mode, us=us, host_us=host))
                    line.append(f"{name} {mode} {us:7.1f} ({host:5.1f})")
                mx.clear_cache()
            print(f"rows {rows:5d} {group:8s} " + "  ".join(line))
    by = {(r["rows"], r["group"], r["variant"], r["mode"]): r for r in results}
    print("\nratios: packed / shared, and each over the floor (µs; host µs)")
    for rows, group, _, mode in sorted({k for k in by if k[2] == "floor"}):
        f, s, p = (by[(rows, group, v, mode)] for v in ("floor", "shared", "packed"))
        print(
            f"rows {rows:5d} {group:8s} {mode:8s} packed/shared {p['us'] / s['us']:.3f} (host {p['host_us'] / s['host_us']:.3f})"
            f"   shared/floor {s['us'] / f['us']:.3f}   packed/floor {p['us'] / f['us']:.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mlx": mx.__version__, "device": str(mx.default_device()), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
