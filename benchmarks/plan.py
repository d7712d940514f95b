"""Benchmark planning and applying a spec on a large module tree, next to mlx-lm's `linear_to_lora_layers`.

1. In memory: a qwen2_moe model with many blocks and switch experts (small hidden size, weights never
   evaluated: MLX arrays are lazy). Each repeat builds a fresh model for each side and times
   * mlx-lm:      model.freeze(); linear_to_lora_layers(model, BLOCKS, {rank, scale, dropout})
   * adapterspec: apply(model, "layers[*]: lora(r=8, scale=20.0)")  (index + plan + build + install)
   on the same config; both adapt the same modules (checked). Also the stages of apply and the plan
   of a multi-rule spec.
2. On a model directory without mlx: the same architecture written to disk with small float16
   tensors, then `ModuleIndex.from_model_dir` + `make_plan` timed in a fresh interpreter that asserts
   mlx was never imported.

    python benchmarks/plan.py                        # 96 blocks, 8 experts, 7 repeats
    python benchmarks/plan.py --blocks 128 --repeats 11 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPEC = "layers[*]: lora(r=8, scale=20.0)\n"
MULTI_RULE_SPEC = """\
defaults lora(r=8, scale=20.0)
layers[*].self_attn.<q,v>_proj: lora
layers[-4:].mlp.switch_mlp.*: lora(r=4)
layers[::2].mlp.shared_expert@linear: lora(r=16, alpha=32)
**.*norm: full
layers[0]: none
"""
LORA_PARAMETERS = {"rank": 8, "scale": 20.0, "dropout": 0.0}

DIR_PLAN_SCRIPT = r"""
import json, sys, time
started = time.perf_counter()
from adapterspec.language.lint import parse_spec
from adapterspec.model.index import ModuleIndex
from adapterspec.model.plan import make_plan
imported = time.perf_counter()
spec_text, model_dir, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
spec = parse_spec(spec_text)
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    index = ModuleIndex.from_model_dir(model_dir)
    t1 = time.perf_counter()
    plan = make_plan(spec, index)
    t2 = time.perf_counter()
    times.append((t1 - t0, t2 - t1))
assert plan.ok, [d.message for d in plan.diagnostics]
mlx = sorted(name for name in sys.modules if name == "mlx" or name.startswith("mlx."))
assert not mlx, f"mlx was imported: {mlx}"
print(json.dumps({"import_s": imported - started, "times": times, "modules": len(index), "entries": len(plan.entries)}))
"""


def model_config(blocks: int, experts: int, hidden: int) -> dict:
    """A qwen2_moe config.json with `blocks` decoder blocks of `experts` experts each."""
    return {
        "model_type": "qwen2_moe",
        "architectures": ["Qwen2MoeForCausalLM"],
        "hidden_size": hidden,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": blocks,
        "intermediate_size": 2 * hidden,
        "moe_intermediate_size": hidden,
        "shared_expert_intermediate_size": 2 * hidden,
        "num_experts": experts,
        "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": 512,
        "max_position_embeddings": 512,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    }


def fresh_model(config: dict):
    """A model of mlx-lm's class for the config; its weights stay lazy (never evaluated)."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


def adapted_paths(model) -> set[str]:
    return {path for path, module in model.named_modules() if "lora_a" in module}


def trainable_count(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def timed(fn) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_mlx_lm(config: dict, blocks: int, count: bool = False) -> tuple[float, object]:
    """mlx-lm's call; with `count`, also the parameter counts `mlx_lm.lora` prints next (a plan has them)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import get_total_parameters

    model = fresh_model(config)

    def call():
        model.freeze()
        linear_to_lora_layers(model, blocks, dict(LORA_PARAMETERS))
        if count:
            get_total_parameters(model), trainable_count(model)

    return timed(call), model


def run_adapterspec(config: dict) -> tuple[float, object]:
    from adapterspec.adapters.install import apply

    model = fresh_model(config)
    return timed(lambda: apply(model, SPEC)), model


def stages(config: dict, repeats: int) -> dict[str, float]:
    """The stages of `apply`, timed one by one: the best of `repeats` fresh models."""
    best: dict[str, float] = {}
    for _ in range(repeats):
        for name, seconds in stages_once(config).items():
            best[name] = min(seconds, best.get(name, seconds))
    return best


def stages_once(config: dict) -> dict[str, float]:
    from adapterspec.adapters.install import build_adapters, has_adapters, install
    from adapterspec.language.lint import parse_spec
    from adapterspec.model.index import ModuleIndex
    from adapterspec.model.plan import make_plan

    model = fresh_model(config)
    out, values = {}, {}

    def step(name, fn):
        gc.collect()
        start = time.perf_counter()
        values[name] = fn()
        out[name] = time.perf_counter() - start

    step("has_adapters", lambda: has_adapters(model))
    step("index (from_module)", lambda: ModuleIndex.from_module(model))
    step("parse", lambda: parse_spec(SPEC))
    step("plan", lambda: make_plan(values["parse"], values["index (from_module)"]))
    step("build adapters", lambda: build_adapters(model, values["plan"]))
    step("install", lambda: install(model, values["plan"], values["build adapters"]))
    return out


def multi_rule_plan(config: dict, repeats: int) -> tuple[float, int, int]:
    from adapterspec.language.lint import parse_spec
    from adapterspec.model.index import ModuleIndex
    from adapterspec.model.plan import make_plan

    index = ModuleIndex.from_module(fresh_model(config))
    spec = parse_spec(MULTI_RULE_SPEC)
    times = []
    for _ in range(repeats):
        times.append(timed(lambda: make_plan(spec, index)))
    plan = make_plan(spec, index)
    assert plan.ok, [d.message for d in plan.diagnostics]
    return min(times), len(index), len(plan.entries)


def write_model_dir(config: dict, path: Path) -> Path:
    """The model written in mlx-lm's layout with small float16 tensors (no tokenizer needed)."""
    import mlx.core as mx
    from mlx_lm.utils import save_config, save_model

    model = fresh_model(config)
    model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    path.mkdir(parents=True, exist_ok=True)
    save_model(path, model)
    save_config(dict(config), path / "config.json")
    return path


def plan_model_dir(config: dict, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(config, Path(tmp) / "model")
        size = sum(f.stat().st_size for f in model_dir.iterdir())
        out = subprocess.run(
            [sys.executable, "-c", DIR_PLAN_SCRIPT, MULTI_RULE_SPEC, str(model_dir), str(repeats)],
            cwd=ROOT, capture_output=True, text=True, check=True,
        )  # fmt: skip
    result = json.loads(out.stdout)
    result["dir_mb"] = size / 1e6
    return result


def describe(times: list[float]) -> str:
    return f"min {min(times) * 1e3:7.1f} ms   median {statistics.median(times) * 1e3:7.1f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=96)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--dir-hidden", type=int, default=32, help="hidden size of the model written to disk")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    import mlx.core as mx
    import mlx_lm

    import adapterspec
    import adapterspec.adapters  # noqa: F401  (imports are not what is timed)

    config = model_config(args.blocks, args.experts, args.hidden)
    print(f"adapterspec {adapterspec.__version__}, mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, "
          f"python {sys.version.split()[0]}, device {mx.default_device()}")  # fmt: skip
    print(f"model: qwen2_moe, {args.blocks} blocks, {args.experts} experts, hidden {args.hidden} (lazy weights)")

    # warm-up: one call on each side, so that first-call costs (imports, caches) are not timed
    run_mlx_lm(config, args.blocks)
    run_adapterspec(config)
    mlx_times, counted_times, ours_times = [], [], []
    for _ in range(args.repeats):  # interleaved, a fresh model for every call
        seconds, reference = run_mlx_lm(config, args.blocks)
        mlx_times.append(seconds)
        counted_times.append(run_mlx_lm(config, args.blocks, count=True)[0])
        seconds, adapted = run_adapterspec(config)
        ours_times.append(seconds)
    same_modules = adapted_paths(reference) == adapted_paths(adapted)
    same_count = trainable_count(reference) == trainable_count(adapted)
    modules = len(adapted_paths(adapted))
    if not (same_modules and same_count):
        print("ERROR: adapterspec and mlx-lm adapted different modules", file=sys.stderr)
        return 1
    ratio_min = min(ours_times) / min(mlx_times)
    ratio_median = statistics.median(ours_times) / statistics.median(mlx_times)
    print(f"\n{modules} adapted modules, same set and trainable count on both sides")
    print(f"  mlx-lm      freeze + linear_to_lora_layers   {describe(mlx_times)}")
    print(f"  mlx-lm      the same + parameter counts        {describe(counted_times)}")
    print(f"  adapterspec apply (index+plan+build+install) {describe(ours_times)}")
    print(f"  ratio adapterspec / mlx-lm: {ratio_min:.2f} (min), {ratio_median:.2f} (median); "
          f"against mlx-lm with counts: {min(ours_times) / min(counted_times):.2f} (min), "
          f"{statistics.median(ours_times) / statistics.median(counted_times):.2f} (median)")  # fmt: skip

    parts = stages(config, args.repeats)
    print("\nstages of apply (best of the repeats):")
    for name, seconds in parts.items():
        print(f"  {name:22s} {seconds * 1e3:7.1f} ms")

    plan_s, index_size, entries = multi_rule_plan(config, args.repeats)
    print(f"\nmake_plan of a 6-line spec on {index_size} modules: {plan_s * 1e3:.1f} ms ({entries} entries)")

    dir_config = model_config(args.blocks, args.experts, args.dir_hidden)
    on_disk = plan_model_dir(dir_config, args.repeats)
    index_s = min(t[0] for t in on_disk["times"])
    dir_plan_s = min(t[1] for t in on_disk["times"])
    total_s = min(a + b for a, b in on_disk["times"])
    cold_s = sum(on_disk["times"][0])
    print(f"\nmodel directory ({on_disk['dir_mb']:.1f} MB, {on_disk['modules']} modules), without mlx:")
    print(f"  ModuleIndex.from_model_dir {index_s * 1e3:7.1f} ms")
    print(f"  make_plan (6-line spec)    {dir_plan_s * 1e3:7.1f} ms")
    print(f"  together                   {total_s * 1e3:7.1f} ms  (first call in the process: {cold_s * 1e3:.1f} ms; "
          f"goal < 100 ms)")  # fmt: skip
    print(f"  importing adapterspec's lint, modules and plan beforehand: {on_disk['import_s'] * 1e3:.0f} ms")

    if args.json:
        figures = {
            "blocks": args.blocks, "experts": args.experts, "hidden": args.hidden, "adapted_modules": modules,
            "mlx_lm_s": mlx_times, "mlx_lm_with_counts_s": counted_times, "adapterspec_s": ours_times,
            "ratio_min": ratio_min,
            "ratio_median": ratio_median, "stages_s": parts, "multi_rule_plan_s": plan_s,
            "model_dir": {"index_s": index_s, "plan_s": dir_plan_s, "total_s": total_s, "cold_s": cold_s, **on_disk},
        }  # fmt: skip
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
