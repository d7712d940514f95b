"""Benchmark switch-DoRA (DoRA on MoE experts) against mlx-lm's switch-LoRA on the experts of a mixtral.

mlx-lm has no DoRA on experts; the nearest layer it has is its LoRASwitchLinear, so the ratios say what
the magnitude and the per-expert row norms cost on top of a switch-LoRA. Forward (eval mode) and a
training step (value_and_grad + eval, adapter parameters trainable), median of rounds that run every
variant once, and each variant's peak memory; the same model and timing loop as benchmarks/layers.py.

    python benchmarks/switch_dora.py                  # small CPU preset
    python benchmarks/switch_dora.py --preset gpu     # 8 blocks, 4096 wide, 8 experts
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from layers import PRESETS, build_model, clone, config_dtype, measure_all, training_step  # noqa: E402

from adapterspec.adapters.install import from_base  # noqa: E402

EXPERTS = ("gate_proj", "up_proj", "down_proj")


def expert_paths(model: nn.Module) -> list[str]:
    return [
        f"model.layers.{i}.block_sparse_moe.switch_mlp.{name}"
        for i in range(len(model.model.layers))
        for name in EXPERTS
    ]


def with_ours(kind: str, paths: list[str], rank: int, scale: float):
    def adapt(model: nn.Module) -> None:
        modules = dict(model.named_modules())
        model.update_modules(tree_unflatten([(p, from_base(kind, modules[p], r=rank, scale=scale)) for p in paths]))

    return adapt


def with_mlxlm(paths: list[str], rank: int, scale: float):
    def adapt(model: nn.Module) -> None:
        from mlx_lm.tuner.utils import linear_to_lora_layers

        linear_to_lora_layers(model, 0, {"rank": rank, "scale": scale, "dropout": 0.0, "keys": set(paths)})

    return adapt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--scale", type=float, default=20.0)
    parser.add_argument("--quantize", action="store_true", help="4-bit experts (QuantizedSwitchLinear)")
    args = parser.parse_args(argv)
    for name, value in PRESETS[args.preset].items():
        setattr(args, name, value)
    args.group_size = 64
    import mlx_lm

    print(f"mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, device {mx.default_device()}", flush=True)
    dtype, note = config_dtype("moe", args)
    model = build_model("moe", args, dtype)
    if args.quantize:
        nn.quantize(model, group_size=args.group_size, bits=4)
        model.freeze()
    mx.random.seed(0)
    inputs = mx.random.randint(0, args.vocab, (args.batch, args.seq))
    targets = mx.random.randint(0, args.vocab, (args.batch, args.seq))
    paths = expert_paths(model)
    print(
        f"mixtral {args.layers}x{args.hidden} experts {args.experts} top-{args.top_k} ffn {args.moe_intermediate} "
        f"{str(dtype).split('.')[-1]}{note}{' 4-bit g64' if args.quantize else ''}, tokens {args.batch}x{args.seq}, "
        f"r={args.rank}, adapters on the {len(paths)} expert SwitchLinears",
        flush=True,
    )
    variants = {
        "mlx-lm switch-lora": with_mlxlm(paths, args.rank, args.scale),
        "adapterspec switch-lora": with_ours("switch-lora", paths, args.rank, args.scale),
        "adapterspec switch-dora": with_ours("switch-dora", paths, args.rank, args.scale),
    }
    forward, step = {}, {}
    base = clone(model)
    base.train(False)
    forward["base"] = lambda: base(inputs)
    for name, adapt in variants.items():
        evaluating, training = clone(model), clone(model)
        adapt(evaluating)
        adapt(training)
        evaluating.train(False)
        training.train(True)
        forward[name] = lambda m=evaluating: m(inputs)
        step[name] = training_step(training, inputs, targets)
    f, s = measure_all(forward, args.warmup, args.iters), measure_all(step, args.warmup, args.iters)
    theirs_f, theirs_s = f["mlx-lm switch-lora"], s["mlx-lm switch-lora"]
    print(f"{'':26}{'fwd ms':>9}{'peak GB':>9}{'step ms':>10}{'peak GB':>9}{'fwd x mlx-lm':>14}{'step x mlx-lm':>15}")
    print(f"{'base':26}{f['base'].ms:9.2f}{f['base'].peak_gb:9.3f}")
    for name in variants:
        print(
            f"{name:26}{f[name].ms:9.2f}{f[name].peak_gb:9.3f}{s[name].ms:10.2f}{s[name].peak_gb:9.3f}"
            f"{f[name].ms / theirs_f.ms:14.3f}{s[name].ms / theirs_s.ms:15.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
