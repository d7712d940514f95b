"""Benchmark adapterspec's adapter layers against mlx-lm's on real mlx-lm models with random weights.

For every configuration it times, on views of one model that share its weights: the base forward
(eval mode), the training-step floor (base frozen, only the norms trainable), and for mlx-lm's
layers and adapterspec's a forward (eval mode) and a training step (value_and_grad + eval,
adapter parameters trainable), with the peak memory of each and the host's time until each call's
work is queued (`mx.async_eval` returns; where it is close to the call's time, the host bounds it).
Each round runs every variant once, so a drifting machine load spreads over all of them; the median
of the rounds is reported.

With --compiled, the step is the one mlx-lm's trainer runs: `mx.compile` over the model's and an
Adam optimizer's state (and the random state), loss, gradients and update in one compiled call;
the forward is compiled too. With --sweep, every configuration runs at every token count of
--tokens and every depth of --depths, one table row per point, and --json is rewritten after each
point (a run cut short keeps what it measured).

    python benchmarks/layers.py                      # small CPU preset, all configurations
    python benchmarks/layers.py --preset gpu         # the issue's 8-block 4096-wide llama
    python benchmarks/layers.py --configs dense,qlora --hidden 512 --iters 5
    python benchmarks/layers.py --preset gpu --compiled --sweep --json sweep.json
"""

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapterspec.adapters import lowrank, pathchoice  # noqa: E402
from adapterspec.adapters.install import from_base  # noqa: E402
from adapterspec.adapters.siblings import link as link_siblings  # noqa: E402

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


# adapterspec variants: (merge_mode, separate path by hand, siblings share their product, a dense base's GEMM adds
# the low-rank term, siblings packed); "before" is the code before measured choices, "unshared" the code before
# siblings shared their low-rank product, "late-sum" a dense base's low-rank term added after its GEMM (an addmm),
# "packed" and "pack-measured" siblings on dense bases packed into one, forced or where measured faster (up to
# `lowrank.PACK_MAX_ROWS` rows), "unpacked" never (the default before)
PACK_DEFAULT = lowrank.pack_siblings  # the library's default, or ADAPTERSPEC_PACK_SIBLINGS
VARIANT_MODES = {  # merge_mode, separate_by_hand, share_siblings, sum_in_base, pack_siblings
    "auto": ("auto", True, True, True, PACK_DEFAULT),
    "model": ("model", True, True, True, PACK_DEFAULT),
    "measure": ("measure", True, True, True, PACK_DEFAULT),
    "never": ("never", True, True, True, PACK_DEFAULT),
    "always": ("always", True, True, True, PACK_DEFAULT),
    "unshared": ("auto", True, False, True, "never"),
    "late-sum": ("auto", True, True, False, "never"),
    "packed": ("auto", True, True, True, "always"),
    "unpacked": ("auto", True, True, True, "never"),
    "pack-measured": ("auto", True, True, True, "auto"),
    "before": ("model", False, False, False, "never"),
}
SWEEP_TOKENS = "1x1024,2x1024,4x1024,8x1024,2x4096"


@dataclass
class Timing:
    ms: float
    peak_gb: float
    first_ms: float = 0.0
    host_ms: float = 0.0  # the host's time until the work is queued (mx.async_eval returns)


@dataclass
class ConfigResult:
    config: str
    description: str
    layers: int
    tokens: str
    compiled: bool
    adapted_modules: int
    base_forward: Timing
    floor_step: Timing
    forward: dict[str, Timing] = field(default_factory=dict)
    step: dict[str, Timing] = field(default_factory=dict)


def build_model(config: str, args: argparse.Namespace, dtype: mx.Dtype, layers: int) -> nn.Module:
    from mlx_lm.models import llama, mixtral

    if config == "moe":
        model_args = mixtral.ModelArgs(
            model_type="mixtral",
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.moe_intermediate,
            num_hidden_layers=layers,
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
            num_hidden_layers=layers,
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
    link_siblings(adapters, modules.get)  # the parents hold their siblings in order (q, k, v, o)


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


def training_step(model: nn.Module, inputs: mx.array, targets: mx.array, compiled: bool):
    """One training step: value_and_grad, or with `compiled` mlx-lm trainer's compiled step (Adam update included)."""
    value_and_grad = nn.value_and_grad(model, loss_fn)
    if not compiled:
        return lambda: value_and_grad(model, inputs, targets)
    import mlx.optimizers as optim

    optimizer = optim.Adam(learning_rate=1e-5)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(inputs, targets):
        loss, grad = value_and_grad(model, inputs, targets)
        optimizer.update(model, grad)
        return loss

    return lambda: (step(inputs, targets), state)


def forward(model: nn.Module, inputs: mx.array, compiled: bool):
    if not compiled:
        return lambda: model(inputs)
    call = mx.compile(lambda x: model(x), inputs=model.state)
    return lambda: call(inputs)


def set_mode(variant: str) -> None:
    (
        lowrank.merge_mode,
        lowrank.separate_by_hand,
        lowrank.share_siblings,
        lowrank.sum_in_base,
        lowrank.pack_siblings,
    ) = VARIANT_MODES[variant]


def in_mode(variant: str, fn):
    def run():
        set_mode(variant)
        return fn()

    return run


def measure_all(variants: dict[str, object], warmup: int, iters: int) -> dict[str, Timing]:
    """Median time (and host time until queued) of each variant over `iters` rounds that run every variant once
    (so drifting load spreads over all of them), then each variant's peak memory in a run of its own."""
    first = {}
    for name, fn in variants.items():
        for i in range(warmup):
            mx.synchronize()
            start = time.perf_counter()
            mx.eval(fn())
            if i == 0:
                first[name] = time.perf_counter() - start
    times = {name: [] for name in variants}
    queued = {name: [] for name in variants}
    for _ in range(iters):
        for name, fn in variants.items():
            mx.synchronize()
            start = time.perf_counter()
            mx.async_eval(fn())
            queued[name].append(time.perf_counter() - start)
            mx.synchronize()
            times[name].append(time.perf_counter() - start)
    peaks = {}
    for name, fn in variants.items():
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        mx.eval(fn())
        peaks[name] = mx.get_peak_memory() / 1e9
    return {
        name: Timing(
            1000 * statistics.median(times[name]),
            peaks[name],
            1000 * first.get(name, 0.0),
            1000 * statistics.median(queued[name]),
        )
        for name in variants
    }


def config_dtype(config: str, args: argparse.Namespace) -> tuple[mx.Dtype, str]:
    dtype = getattr(mx, args.dtype)
    if dtype == mx.float32 or mx.default_device().type != mx.DeviceType.cpu:
        return dtype, ""
    if config == "moe":
        return mx.float32, " (float32: MLX's CPU gather_mm has no bfloat16)"
    if config == "qlora":
        return mx.float32, " (float32: MLX's CPU quantized matmul is ~20x slower in bfloat16)"
    return dtype, ""


def describe(config: str, args: argparse.Namespace, dtype: mx.Dtype, dtype_note: str, layers: int, tokens) -> str:
    return (
        f"{'mixtral' if config == 'moe' else 'llama'} {layers}x{args.hidden}"
        + (
            f" experts {args.experts} top-{args.top_k} ffn {args.moe_intermediate}"
            if config == "moe"
            else f" ffn {args.intermediate}"
        )
        + f" vocab {args.vocab} {str(dtype).split('.')[-1]}{dtype_note}"
        + (f" 4-bit g{args.group_size}" if config == "qlora" else "")
        + (" tied embeddings" if config == "embedding" else "")
        + f", tokens {tokens[0]}x{tokens[1]}, r={args.rank}"
    )


def run_config(config: str, args: argparse.Namespace) -> ConfigResult:
    dtype, _ = config_dtype(config, args)
    model = build_model(config, args, dtype, args.layers)
    result = run_point(config, model, args, (args.batch, args.seq))
    del model
    mx.clear_cache()
    return result


def run_point(config: str, model: nn.Module, args: argparse.Namespace, tokens: tuple[int, int]) -> ConfigResult:
    """Every variant of one configuration at one token count, on views of `model`."""
    dtype, dtype_note = config_dtype(config, args)
    layers = len(model.model.layers)
    batch, seq = tokens
    mx.random.seed(0)
    inputs = mx.random.randint(0, args.vocab, (batch, seq))
    targets = mx.random.randint(0, args.vocab, (batch, seq))
    paths = adapted_paths(model, config)
    description = describe(config, args, dtype, dtype_note, layers, tokens)

    def view(adapt, training: bool) -> nn.Module:
        """A model sharing the base weights, with its own adapters, in training or eval mode."""
        twin = clone(model)
        adapt(twin)
        twin.train(training)
        return twin

    def floor_view(twin):
        twin.apply_to_modules(lambda _, m: m.unfreeze() if isinstance(m, nn.RMSNorm) else None)

    def mlxlm_view(twin):
        apply_mlxlm(twin, paths, args.rank, args.scale)

    def ours_view(twin):
        apply_adapterspec(twin, paths, args.rank, args.scale)

    compiled = args.compiled
    forwards = {"base": in_mode("auto", forward(view(lambda twin: None, training=False), inputs, compiled))}
    steps = {"floor": in_mode("auto", training_step(view(floor_view, True), inputs, targets, compiled))}
    variants = [("mlx-lm", "auto", mlxlm_view)]
    variants += [("adapterspec" if m == "auto" else f"adapterspec[{m}]", m, ours_view) for m in args.modes]
    for name, mode, adapt in variants:
        set_mode(mode)  # siblings' bases are stacked (or not) when the adapters are put in place
        forwards[name] = in_mode(mode, forward(view(adapt, training=False), inputs, compiled))
        steps[name] = in_mode(mode, training_step(view(adapt, True), inputs, targets, compiled))

    forward_timings = measure_all(forwards, args.warmup, args.iters)
    step_timings = measure_all(steps, args.warmup, args.iters)
    set_mode("auto")
    result = ConfigResult(
        config,
        description,
        layers,
        f"{batch}x{seq}",
        compiled,
        len(paths),
        forward_timings.pop("base"),
        step_timings.pop("floor"),
        forward_timings,
        step_timings,
    )
    del forwards, steps
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


def sweep_header(modes: list[str]) -> str:
    extra = [f"adapterspec[{m}]" for m in modes if m != "auto"]
    columns = [
        "config",
        "blocks",
        "tokens",
        "floor ms",
        "mlx-lm × floor",
        "adapterspec × floor",
        *[f"{name} × floor" for name in extra],
        "step: mlx-lm / adapterspec",
        "base fwd ms",
        "mlx-lm × base",
        "adapterspec × base",
        *[f"{name} × base" for name in extra],
        "step peak GB: floor / mlx-lm / adapterspec",
        "first step s: mlx-lm / adapterspec",
        "step host ms: floor / mlx-lm / adapterspec",
    ]
    return "| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns)


def sweep_row(result: ConfigResult) -> str:
    ours = [name for name in result.step if name != "mlx-lm"]
    main = "adapterspec" if "adapterspec" in result.step else ours[0]
    floor, base = result.floor_step, result.base_forward
    theirs_s, theirs_f = result.step["mlx-lm"], result.forward["mlx-lm"]
    cells = [
        result.config,
        str(result.layers),
        result.tokens,
        f"{floor.ms:.1f}",
        f"{theirs_s.ms / floor.ms:.2f}",
        f"**{result.step[main].ms / floor.ms:.2f}**",
        *[f"{result.step[n].ms / floor.ms:.2f}" for n in ours if n != main],
        f"{theirs_s.ms / result.step[main].ms:.2f}",
        f"{base.ms:.1f}",
        f"{theirs_f.ms / base.ms:.2f}",
        f"**{result.forward[main].ms / base.ms:.2f}**",
        *[f"{result.forward[n].ms / base.ms:.2f}" for n in ours if n != main],
        f"{floor.peak_gb:.1f} / {theirs_s.peak_gb:.1f} / {result.step[main].peak_gb:.1f}",
        f"{theirs_s.first_ms / 1000:.1f} / {result.step[main].first_ms / 1000:.1f}",
        f"{floor.host_ms:.1f} / {theirs_s.host_ms:.1f} / {result.step[main].host_ms:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


def parse_tokens(text: str) -> list[tuple[int, int]]:
    """ "1x1024,2x4096" -> [(1, 1024), (2, 4096)] (batch x sequence length)."""
    points = []
    for item in text.split(","):
        batch, _, seq = item.strip().partition("x")
        points.append((int(batch), int(seq)))
    return points


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {CONFIGS}")
    parser.add_argument(
        "--modes",
        default="auto",
        help=f"comma-separated adapterspec variants to time, of {tuple(VARIANT_MODES)} "
        "(merge modes; 'before' = bytes-modelled choice and the separate path left to autodiff)",
    )
    parser.add_argument("--compiled", action="store_true", help="time mlx-lm trainer's compiled step (Adam)")
    parser.add_argument("--sweep", action="store_true", help="every configuration at every --tokens and --depths")
    parser.add_argument("--tokens", default=SWEEP_TOKENS, help="sweep token counts, BATCHxSEQ,...")
    parser.add_argument("--depths", default="8,32", help="sweep depths (blocks), comma-separated")
    parser.add_argument(
        "--deep-configs", default=None, help="configurations run at depths beyond the first (default: all)"
    )
    parser.add_argument(
        "--deep-tokens", default=None, help="token counts run at depths beyond the first (default: all)"
    )
    parser.add_argument("--max-seconds", type=float, default=None, help="stop the sweep after this long")
    parser.add_argument(
        "--memory-limit-gb", type=float, default=None,
        help="mx.set_memory_limit: evaluation waits for the device when more is in use (bounds work queued ahead)",
    )  # fmt: skip
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
    args.tokens = parse_tokens(args.tokens)
    args.depths = [int(d) for d in args.depths.split(",") if d]
    args.deep_configs = args.configs if args.deep_configs is None else [c for c in args.deep_configs.split(",") if c]
    args.deep_tokens = args.tokens if args.deep_tokens is None else parse_tokens(args.deep_tokens)
    unknown = [c for c in args.configs + args.deep_configs if c not in CONFIGS]
    unknown += [m for m in args.modes if m not in VARIANT_MODES]
    if unknown:
        parser.error(f"unknown configs or modes: {unknown}")
    return args


def versions() -> dict:
    import mlx_lm

    info = {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "device": str(mx.default_device())}
    try:
        info["device_name"] = mx.device_info().get("device_name", "")
    except Exception:
        pass
    return info


def write_json(path, header: dict, results: list[ConfigResult]) -> None:
    if path:
        Path(path).write_text(json.dumps({**header, "results": [asdict(r) for r in results]}, indent=1))


def sweep(args: argparse.Namespace, header: dict) -> list[ConfigResult]:
    started = time.perf_counter()
    results = []
    print(sweep_header(args.modes), flush=True)
    for depth_index, depth in enumerate(args.depths):
        configs = args.configs if depth_index == 0 else [c for c in args.configs if c in args.deep_configs]
        tokens = args.tokens if depth_index == 0 else args.deep_tokens
        for config in configs:
            dtype, _ = config_dtype(config, args)
            model = build_model(config, args, dtype, depth)
            for point in tokens:
                if args.max_seconds and time.perf_counter() - started > args.max_seconds:
                    print(f"(stopped after {args.max_seconds:.0f} s)", flush=True)
                    return results
                results.append(run_point(config, model, args, point))
                print(sweep_row(results[-1]), flush=True)
                write_json(args.json, header, results)
            del model
            mx.clear_cache()
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_limit_gb:
        mx.set_memory_limit(int(args.memory_limit_gb * 1e9))
    header = {**versions(), "compiled": args.compiled, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(", ".join(f"{k} {v}" for k, v in header.items()), flush=True)
    if args.sweep:
        results = sweep(args, header)
    else:
        results = []
        for config in args.configs:
            result = run_config(config, args)
            print(report(result), flush=True)
            results.append(result)
    write_json(args.json, header, results)
    if pathchoice.timings:
        print("measured path choices (median ms per candidate):")
        for key, medians in pathchoice.timings.items():
            shown = ", ".join(f"{name} {1000 * t:.3f}" for name, t in medians.items())
            print(f"  {key}: {shown} -> {pathchoice.choices.get(key)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
