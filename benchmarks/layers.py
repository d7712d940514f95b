"""Benchmark adapterspec's adapter layers against mlx-lm's on real mlx-lm models with random weights.

For every configuration it times, on views of one model that share its weights: the base forward
(eval mode), the training-step floor (base frozen, only the norms trainable), and for mlx-lm's
layers and adapterspec's a forward (eval mode) and a training step (value_and_grad + eval,
adapter parameters trainable), with the peak memory of each. Each round runs every variant once,
so a drifting machine load spreads over all of them; the median of the rounds is reported.

    python benchmarks/layers.py                      # small CPU preset, all configurations
    python benchmarks/layers.py --preset gpu         # the issue's 8-block 4096-wide llama
    python benchmarks/layers.py --configs dense,qlora --hidden 512 --iters 5
"""

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapterspec.adapters import lowrank  # noqa: E402
from adapterspec.adapters.install import from_base  # noqa: E402

CONFIGS = ("dense", "moe", "qlora", "embedding")
PRESETS = {
    "cpu": dict(
        layers=2,
        hidden=256,
        intermediate=768,
        heads=4,
        kv_heads=2,
        vocab=2048,
        batch=2,
        seq=64,
        experts=4,
        top_k=2,
        moe_intermediate=256,
        warmup=1,
        iters=5,
    ),
    "gpu": dict(
        layers=8,
        hidden=4096,
        intermediate=11008,
        heads=32,
        kv_heads=8,
        vocab=32000,
        batch=8,
        seq=1024,
        experts=8,
        top_k=2,
        moe_intermediate=4096,
        warmup=3,
        iters=10,
    ),
}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class Timing:
    ms: float
    peak_gb: float


@dataclass
class ConfigResult:
    config: str
    description: str
    adapted_modules: int
    base_forward: Timing
    floor_step: Timing
    forward: dict[str, Timing] = field(default_factory=dict)
    step: dict[str, Timing] = field(default_factory=dict)


def build_model(config: str, args: argparse.Namespace, dtype: mx.Dtype) -> nn.Module:
    from mlx_lm.models import llama, mixtral

    if config == "moe":
        model_args = mixtral.ModelArgs(
            model_type="mixtral",
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.moe_intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            num_local_experts=args.experts,
            num_experts_per_tok=args.top_k,
        )
        model = mixtral.Model(model_args)
    else:
        model_args = llama.ModelArgs(
            model_type="llama",
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            intermediate_size=args.intermediate,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            rms_norm_eps=1e-5,
            vocab_size=args.vocab,
            tie_word_embeddings=(config == "embedding"),
        )
        model = llama.Model(model_args)
    model.set_dtype(dtype)
    if config == "qlora":
        nn.quantize(model, group_size=args.group_size, bits=4)
    mx.eval(model.parameters())
    model.freeze()
    return model


def adapted_paths(model: nn.Module, config: str) -> list[str]:
    """Module paths that get an adapter: every attention and MLP linear (experts included) or the embedding."""
    if config == "embedding":
        return ["model.embed_tokens"]
    mlp = "block_sparse_moe.switch_mlp" if config == "moe" else "mlp"
    names = [f"self_attn.{n}" for n in ATTENTION] + [f"{mlp}.{n}" for n in MLP]
    return [f"model.layers.{i}.{n}" for i in range(len(model.model.layers)) for n in names]


def kind_of(module: nn.Module) -> str:
    name = type(module).__name__
    if "Switch" in name:
        return "switch-lora"
    return "embedding-lora" if "Embedding" in name else "lora"


def apply_adapterspec(model: nn.Module, paths: list[str], rank: int, scale: float) -> None:
    modules = dict(model.named_modules())
    adapters = [(p, from_base(kind_of(modules[p]), modules[p], r=rank, scale=scale, dropout=0.0)) for p in paths]
    model.update_modules(tree_unflatten(adapters))


def apply_mlxlm(model: nn.Module, paths: list[str], rank: int, scale: float) -> None:
    from mlx_lm.tuner.utils import linear_to_lora_layers

    config = {"rank": rank, "scale": scale, "dropout": 0.0, "keys": set(paths)}
    linear_to_lora_layers(model, 0, config)


def clone(module: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every array with `module` but has its own frozen flags."""
    twin = copy.copy(module)
    twin.__dict__["_no_grad"] = set(module._no_grad)
    for key, value in module.items():
        if isinstance(value, nn.Module):
            twin[key] = clone(value)
        elif isinstance(value, list):
            twin[key] = [clone(v) if isinstance(v, nn.Module) else v for v in value]
    return twin


def loss_fn(model: nn.Module, inputs: mx.array, targets: mx.array) -> mx.array:
    logits = model(inputs)
    return nn.losses.cross_entropy(logits, targets).astype(mx.float32).mean()


def training_step(model: nn.Module, inputs: mx.array, targets: mx.array):
    value_and_grad = nn.value_and_grad(model, loss_fn)
    return lambda: value_and_grad(model, inputs, targets)


def in_mode(mode: str, fn):
    def run():
        lowrank.merge_mode = mode
        return fn()

    return run


def measure_all(variants: dict[str, object], warmup: int, iters: int) -> dict[str, Timing]:
    """Median time of each variant over `iters` rounds that run every variant once (so drifting load
    spreads over all of them), then each variant's peak memory in a run of its own."""
    for fn in variants.values():
        for _ in range(warmup):
            mx.eval(fn())
    times = {name: [] for name in variants}
    for _ in range(iters):
        for name, fn in variants.items():
            mx.synchronize()
            start = time.perf_counter()
            mx.eval(fn())
            times[name].append(time.perf_counter() - start)
    peaks = {}
    for name, fn in variants.items():
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        mx.eval(fn())
        peaks[name] = mx.get_peak_memory() / 1e9
    return {name: Timing(1000 * statistics.median(times[name]), peaks[name]) for name in variants}


def config_dtype(config: str, args: argparse.Namespace) -> tuple[mx.Dtype, str]:
    dtype = getattr(mx, args.dtype)
    if dtype == mx.float32 or mx.default_device().type != mx.DeviceType.cpu:
        return dtype, ""
    if config == "moe":
        return mx.float32, " (float32: MLX's CPU gather_mm has no bfloat16)"
    if config == "qlora":
        return mx.float32, " (float32: MLX's CPU quantized matmul is ~20x slower in bfloat16)"
    return dtype, ""


def run_config(config: str, args: argparse.Namespace) -> ConfigResult:
    dtype, dtype_note = config_dtype(config, args)
    model = build_model(config, args, dtype)
    mx.random.seed(0)
    inputs = mx.random.randint(0, args.vocab, (args.batch, args.seq))
    targets = mx.random.randint(0, args.vocab, (args.batch, args.seq))
    paths = adapted_paths(model, config)
    description = (
        f"{'mixtral' if config == 'moe' else 'llama'} {args.layers}x{args.hidden}"
        + (
            f" experts {args.experts} top-{args.top_k} ffn {args.moe_intermediate}"
            if config == "moe"
            else f" ffn {args.intermediate}"
        )
        + f" vocab {args.vocab} {str(dtype).split('.')[-1]}{dtype_note}"
        + (f" 4-bit g{args.group_size}" if config == "qlora" else "")
        + (" tied embeddings" if config == "embedding" else "")
        + f", tokens {args.batch}x{args.seq}, r={args.rank}"
    )

    def view(adapt, training: bool) -> nn.Module:
        """A model sharing the base weights, with its own adapters, in training or eval mode."""
        twin = clone(model)  # noqa: F821 (deleted at the end of the function, after its last use)
        adapt(twin)
        twin.train(training)
        return twin

    def floor_view(twin):
        twin.apply_to_modules(lambda _, m: m.unfreeze() if isinstance(m, nn.RMSNorm) else None)

    def mlxlm_view(twin):
        apply_mlxlm(twin, paths, args.rank, args.scale)

    def ours_view(twin):
        apply_adapterspec(twin, paths, args.rank, args.scale)

    base_model = view(lambda twin: None, training=False)
    forward = {"base": in_mode("auto", lambda: base_model(inputs))}  # noqa: F821 (deleted at the end, after its last use)
    step = {"floor": in_mode("auto", training_step(view(floor_view, True), inputs, targets))}
    variants = [("mlx-lm", "auto", mlxlm_view)]
    variants += [("adapterspec" if m == "auto" else f"adapterspec[{m}]", m, ours_view) for m in args.modes]
    for name, mode, adapt in variants:
        forward_model = view(adapt, training=False)
        forward[name] = in_mode(mode, lambda forward_model=forward_model: forward_model(inputs))
        step[name] = in_mode(mode, training_step(view(adapt, True), inputs, targets))

    forward_timings = measure_all(forward, args.warmup, args.iters)
    step_timings = measure_all(step, args.warmup, args.iters)
    lowrank.merge_mode = "auto"
    result = ConfigResult(
        config,
        description,
        len(paths),
        forward_timings.pop("base"),
        step_timings.pop("floor"),
        forward_timings,
        step_timings,
    )
    del model, base_model, forward, step
    mx.clear_cache()
    return result


def report(result: ConfigResult) -> str:
    lines = [
        f"== {result.config}: {result.description}, {result.adapted_modules} adapted modules",
        f"{'':24}{'fwd ms':>9}{'x base':>8}{'peak GB':>9}{'step ms':>10}{'x floor':>9}{'peak GB':>9}"
        f"{'fwd x mlx-lm':>14}{'step x mlx-lm':>15}",
        f"{'base / floor':24}{result.base_forward.ms:9.2f}{1:8.3f}{result.base_forward.peak_gb:9.3f}"
        f"{result.floor_step.ms:10.2f}{1:9.3f}{result.floor_step.peak_gb:9.3f}",
    ]
    theirs_f, theirs_s = result.forward["mlx-lm"], result.step["mlx-lm"]
    for name in result.forward:
        f, s = result.forward[name], result.step[name]
        lines.append(
            f"{name:24}{f.ms:9.2f}{f.ms / result.base_forward.ms:8.3f}{f.peak_gb:9.3f}"
            f"{s.ms:10.2f}{s.ms / result.floor_step.ms:9.3f}{s.peak_gb:9.3f}"
            f"{f.ms / theirs_f.ms:14.3f}{s.ms / theirs_s.ms:15.3f}"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {CONFIGS}")
    parser.add_argument(
        "--modes", default="auto", help=f"comma-separated adapterspec merge modes to time, of {lowrank.MERGE_MODES}"
    )
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--scale", type=float, default=20.0)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--json", help="also write the results to this file")
    for name, value in PRESETS["cpu"].items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"(cpu preset: {value})")
    args = parser.parse_args(argv)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.configs = [c for c in args.configs.split(",") if c]
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = [c for c in args.configs if c not in CONFIGS] + [m for m in args.modes if m not in lowrank.MERGE_MODES]
    if unknown:
        parser.error(f"unknown configs or modes: {unknown}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import mlx_lm

    print(f"mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, device {mx.default_device()}", flush=True)
    results = []
    for config in args.configs:
        result = run_config(config, args)
        print(report(result), flush=True)
        results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
