"""Count the operations of one compiled training step, by kind: the floor, mlx-lm's layers and adapterspec's.

At a thousand tokens on a CUDA GPU the adapted step waits on the host that queues its work (`layers.py`'s host
time; about 11 µs of host time per operation, 13–15 µs per GEMM, on an H100), so the number of operations a
step holds is what small steps cost. The count is the same on every device, so it can be read on a CPU: the
step is compiled as mlx-lm's trainer compiles it (`layers.training_step`) on a small llama, and the graph of
one call's outputs (the compiled tape: fused elementwise kernels appear as `Compiled…`) is counted.

    python benchmarks/step_graph.py                 # 2 blocks, every linear adapted
    python benchmarks/step_graph.py --layers 4 --top 20
"""

import argparse
import collections
import io
import re
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))

import layers  # noqa: E402


def count(arrays: list[mx.array]) -> collections.Counter:
    """Operations in the graph behind `arrays`, by kind (a fused kernel counts as one)."""
    dot = io.StringIO()
    mx.export_to_dot(dot, *arrays)
    kinds = re.findall(r'label ="([A-Za-z]+)', dot.getvalue())
    return collections.Counter("Compiled (fused)" if k.startswith("Compiled") else k for k in kinds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--modes", default="auto", help="adapterspec variants (layers.py's modes), comma-separated")
    parser.add_argument("--top", type=int, default=12, help="kinds listed per variant")
    parser.add_argument(
        "--eager-first",
        action="store_true",
        help="one eager forward before the compiled step (as mlx-lm's trainer validates first): siblings learn then",
    )
    args = parser.parse_args(argv)
    options = layers.parse_args(["--configs", "dense", "--hidden", "64", "--intermediate", "128", "--heads", "4",
                                 "--kv-heads", "2", "--vocab", "256", "--batch", "1", "--seq", "16"])  # fmt: skip
    model = layers.build_model("dense", options, mx.float32, args.layers)
    paths = layers.adapted_paths(model, "dense")
    tokens = mx.random.randint(0, options.vocab, (1, 16))

    def floor(twin):
        twin.apply_to_modules(lambda _, m: m.unfreeze() if isinstance(m, layers.nn.RMSNorm) else None)

    variants = [("floor", "auto", floor), ("mlx-lm", "auto", lambda t: layers.apply_mlxlm(t, paths, 8, 20.0))]
    variants += [(f"adapterspec[{m}]", m, lambda t: layers.apply_adapterspec(t, paths, 8, 20.0))
                 for m in args.modes.split(",")]  # fmt: skip
    print(f"one compiled step, dense llama, {args.layers} blocks, {len(paths)} adapted linears")
    floor_total = None
    for name, mode, adapt in variants:
        layers.set_mode(mode)
        twin = layers.clone(model)
        adapt(twin)
        twin.train(True)
        if args.eager_first:
            mx.eval(layers.loss_fn(twin, tokens, tokens))
        step = layers.training_step(twin, tokens, tokens, compiled=True)
        for _ in range(2):  # the first call traces; siblings learn their partners in it
            mx.eval(step())
        loss, state = step()
        kinds = count([loss] + [v for _, v in tree_flatten(state) if isinstance(v, mx.array)])
        total = sum(kinds.values())
        floor_total = total if floor_total is None else floor_total
        extra = f", {(total - floor_total) / len(paths):+.1f} per adapted linear" if name != "floor" else ""
        print(f"{name:24} {total:5d} operations{extra}")
        print("    " + ", ".join(f"{kind} {n}" for kind, n in kinds.most_common(args.top)))
    layers.set_mode("auto")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
