"""Benchmark `adapterspec fuse` against `mlx_lm fuse` on a generated llama with LoRA on every linear of every block.

The model (random weights, float16, written in N shards into a temporary directory) and its 4-bit
quantization (group 64, as mlx_lm.convert) are fused with the same adapters (r=8, scale 20, random
nonzero B) by both tools, each in a fresh process: wall and CPU time from wait4, peak memory of the
whole process tree (adapterspec's worker processes included) sampled from /proc, as summed RSS and
as PSS (shared library pages split among the processes sharing them; the bound is checked on it).
The floor is the time to read the model's weight files and write as many bytes.

    python benchmarks/fuse.py                     # ≈1 GB float16 model in 4 shards, float16 and 4-bit
    python benchmarks/fuse.py --size-gb 2.4 --shards 1 --runs 2
    python benchmarks/fuse.py --dtypes float16 --json results.json
    python benchmarks/fuse.py --size-gb 2.4 --skip-mlx-lm --also "cpu=--device cpu" --compare   # on a GPU
    python benchmarks/fuse.py --size-gb 0.3 --runs 1 --skip-mlx-lm --trace     # and where one fuse's time goes

With --compare, the first run's files of each `--also` variant are compared with the default's, tensor
by tensor: how many values differ, by how many units in the last place (float tensors), and for
quantized weights by how many quantization steps of the group (dequantized as mlx does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SPEC = """adapterspec 1

layers[*].self_attn.<q,k,v,o>_proj: lora(r=8, scale=20.0)
layers[*].mlp.<gate,up,down>_proj: lora(r=8, scale=20.0)
"""
GOAL_RATIO_TO_MLX_LM = 1 / 3
GOAL_RATIO_TO_FLOOR = 2.0
# The accelerator's goals (on a GPU host): the fuse within these multiples of the read + write floor.
GPU_GOAL_RATIO_TO_FLOOR = {"float16": 1.2, "4bit": 1.5}
RSS_ALLOWANCE = 300 << 20
SAMPLE_SECONDS = 0.05
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Run:
    tool: str
    variant: str
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    peak_pss_mb: float


@dataclass
class VariantResult:
    variant: str
    model_gb: float
    shards: int
    largest_shard_mb: float
    adapters_mb: float
    floor_s: float
    adapterspec: Run
    mlx_lm: Run
    others: dict = field(default_factory=dict)
    comparisons: dict = field(default_factory=dict)

    @property
    def rss_bound_mb(self) -> float:
        return self.largest_shard_mb + self.adapters_mb + RSS_ALLOWANCE / 2**20


# ── the model and adapters ──────────────────────────────────────────────────


def llama_config(layers: int) -> dict:
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-5, "vocab_size": VOCAB, "rope_theta": 10000.0,
        "max_position_embeddings": 2048, "tie_word_embeddings": False, "torch_dtype": "float16",
    }  # fmt: skip


def layers_for(size_gb: float) -> int:
    per_layer = 2 * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * HIDDEN * KV_HEADS // HEADS + 3 * HIDDEN * INTERMEDIATE)
    embeddings = 2 * 2 * VOCAB * HIDDEN
    return max(1, round((size_gb * 1e9 - embeddings) / per_layer))


def model_tensors(config: dict) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, quantizable) of every weight, in mlx-lm's parameter order, from the model class."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    quantizable = {
        path for path, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.shape[-1] % 64 == 0
    }  # fmt: skip
    return [
        (name, tuple(value.shape), name.rpartition(".")[0] in quantizable and name.endswith(".weight"))
        for name, value in tree_flatten(model.parameters())
    ]


def write_model(path: Path, config: dict, shards: int, quantize: bool, seed: int = 0) -> None:
    """A model directory in mlx-lm's layout with random float16 weights (4-bit quantized when asked)."""
    import mlx.core as mx

    from adapterspec.fuse.shards import ShardWriter, nbytes_of

    path.mkdir(parents=True)
    mx.random.seed(seed)
    tensors = []
    for name, shape, quantizable in model_tensors(config):
        if quantize and quantizable:
            rows, cols = shape
            owner = name.rpartition(".")[0]
            tensors += [(name, "uint32", (rows, cols // 8)), (f"{owner}.scales", "float16", (rows, cols // 64)),
                        (f"{owner}.biases", "float16", (rows, cols // 64))]  # fmt: skip
        else:
            tensors.append((name, "float16", shape))
    total = sum(nbytes_of(d, s) for _, d, s in tensors)
    limit = total / shards * 1.02
    groups, size = [], 0
    for tensor in tensors:
        n = nbytes_of(tensor[1], tensor[2])
        if not groups or size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += n
    quantized: dict[str, dict] = {}

    def value_of(name: str, dtype: str, shape: tuple[int, ...]):
        owner, _, param = name.rpartition(".")
        if quantize and dtype != "float16" or param in ("scales", "biases"):
            if owner not in quantized:
                quantized.clear()
                rows, packed = shape if param == "weight" else (shape[0], shape[1] * 8)
                parts = mx.quantize(mx.random.normal((rows, packed * 8), dtype=mx.float16) * 0.02, 64, 4)
                quantized[owner] = dict(zip(("weight", "scales", "biases"), parts))
            return quantized[owner][param]
        if len(shape) == 1:
            return mx.ones(shape, dtype=mx.float16)
        return mx.random.normal(shape, dtype=mx.float16) * 0.02

    weight_map = {}
    for i, group in enumerate(groups):
        filename = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        writer = ShardWriter(path / filename, group, {"format": "mlx"})
        for name, dtype, shape in group:
            value = value_of(name, dtype, shape)
            mx.eval(value)
            writer.write(name, value)
            weight_map[name] = filename
        writer.close()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    if quantize:
        config = {**config, "quantization": {"group_size": 64, "bits": 4, "mode": "affine"}}
        config["quantization_config"] = config["quantization"]
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    (path / "config.json").write_text(json.dumps(config, indent=4))
    from tests.models import write_tokenizer

    write_tokenizer(path, 320)


def write_adapters(model_dir: Path, path: Path, seed: int = 1) -> None:
    """LoRA r=8 on the seven linears of every block, random nonzero B, in an adapter directory both tools read."""
    import mlx.core as mx

    from adapterspec.language.lint import parse_spec
    from adapterspec.model.adapter_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config
    from adapterspec.model.index import ModuleIndex
    from adapterspec.model.plan import make_plan

    index = ModuleIndex.from_model_dir(model_dir)
    plan = make_plan(parse_spec(SPEC, "bench.aspec"), index)
    assert plan.ok, plan.diagnostics
    mx.random.seed(seed)
    weights = {}
    for entry in plan.entries:
        info = index[entry.path]
        bound = info.input_dims**-0.5
        weights[f"{entry.path}.lora_a"] = mx.random.uniform(-bound, bound, (info.input_dims, entry.r))
        weights[f"{entry.path}.lora_b"] = mx.random.normal((entry.r, info.output_dims)) * 0.01
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / ADAPTER_WEIGHTS), weights, metadata={"format": "mlx"})
    config = adapter_config(plan)
    assert config["adapterspec"]["mlx_lm_compatible"], config["adapterspec"]
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


# ── measuring ───────────────────────────────────────────────────────────────


def measure(command: list[str], tool: str, variant: str, env: dict | None = None) -> Run:
    """Wall time, CPU time and peak memory of a command run in a fresh process.

    The peak is that of the whole process tree (the fuse's worker processes included), summed over
    the processes alive at each moment; /proc is sampled every SAMPLE_SECONDS where there is one,
    and wait4's peak (the largest single process) is the floor of it. With SAMPLE_SECONDS 0 (--sample-seconds 0)
    nothing is sampled: reading a process's smaps takes its memory map's lock, which its own page faults wait for.
    """
    errors = tempfile.TemporaryFile()
    started = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=errors, cwd=ROOT, env={**os.environ, **(env or {})}
    )
    tree_peak, tree_pss_peak = 0, 0
    while SAMPLE_SECONDS:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        rss, pss = tree_memory(process.pid)
        tree_peak, tree_pss_peak = max(tree_peak, rss), max(tree_pss_peak, pss)
        time.sleep(SAMPLE_SECONDS)
    else:
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    errors.seek(0)
    stderr = errors.read().decode(errors="replace")
    errors.close()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr}")
    peak = max(tree_peak / 2**20, usage.ru_maxrss / 1024)
    return Run(tool, variant, wall, usage.ru_utime + usage.ru_stime, peak, tree_pss_peak / 2**20 or peak)


def tree_memory(pid: int) -> tuple[int, int]:
    """Resident and proportional (PSS) bytes of a process and all its descendants now (0 where /proc cannot tell).

    Summed RSS counts the pages that processes share (libpython, numpy's and BLAS's libraries) once per
    process; PSS splits them among their sharers, so it sums to what the tree occupies.
    """
    rss, pss, todo = 0, 0, [pid]
    while todo:
        current = todo.pop()
        try:
            rss += int(Path(f"/proc/{current}/statm").read_text().split()[1]) * PAGE_BYTES
            pss += _pss(current)
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(child) for child in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return rss, pss


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def floor_seconds(model_dir: Path, scratch: Path) -> float:
    """Read every weight file of the model and write as many bytes, as plainly as Python can."""
    started = time.perf_counter()
    for source in sorted(model_dir.glob("*.safetensors")):
        with open(source, "rb") as f, open(scratch / source.name, "wb") as out:
            while chunk := f.read(64 << 20):
                out.write(chunk)
    seconds = time.perf_counter() - started
    for written in scratch.glob("*.safetensors"):
        written.unlink()
    return seconds


def best(runs: list[Run]) -> Run:
    return min(runs, key=lambda r: r.wall_s)


def parse_other(text: str) -> tuple[str, list[str], dict]:
    """--also LABEL=ARGS: a variant of our fuse (ARGS: extra options, NAME=VALUE words are environment)."""
    import shlex

    label, _, rest = text.partition("=")
    words = shlex.split(rest)
    env = dict(w.split("=", 1) for w in words if "=" in w and w.split("=", 1)[0].isupper())
    return label, [w for w in words if not ("=" in w and w.split("=", 1)[0].isupper())], env


def bench_variant(
    work: Path,
    variant: str,
    layers: int,
    shards: int,
    runs: int,
    others=(),
    skip_mlx_lm: bool = False,
    compare: bool = False,
    trace: bool = False,
) -> VariantResult:
    model_dir, adapter_dir = work / f"model-{variant}", work / f"adapters-{variant}"
    print(f"[{variant}] writing the model ({layers} blocks, {shards} shards) and adapters …", file=sys.stderr)
    # In a child process: a parent that held the model would pass its memory on to every forked child's peak RSS.
    subprocess.run([sys.executable, __file__, "--write-model", str(work), "--variant", variant, "--layers", str(layers),
                    "--shards", str(shards)], check=True)  # fmt: skip
    weight_files = list(model_dir.glob("*.safetensors"))
    scratch = work / "scratch"
    scratch.mkdir(exist_ok=True)
    floors, ours, theirs = [], [], []
    ours_command = [
        sys.executable,
        "-m",
        "adapterspec",
        "fuse",
        str(model_dir),
        str(adapter_dir),
        "-o",
        str(work / f"out-adapterspec-{variant}"),
        "--quiet",
        "--force",
    ]
    warm_up = measure(ours_command, "warm-up", variant)  # MLX builds its kernels once per machine; not timed
    print(f"[{variant}] warm-up (the kernels built): {warm_up.wall_s:.2f} s", file=sys.stderr)
    shutil.rmtree(work / f"out-adapterspec-{variant}")
    comparisons, other_runs = {}, {}
    for i in range(runs):
        floors.append(floor_seconds(model_dir, scratch))
        ours.append(measure(ours_command, "adapterspec fuse", variant))
        kept = work / f"kept-{variant}"
        if compare and i == 0:
            os.replace(work / f"out-adapterspec-{variant}", kept)
        else:
            shutil.rmtree(work / f"out-adapterspec-{variant}")
        for label, extra, env in others:
            other = measure(ours_command + extra, f"adapterspec fuse {label}", variant, env)
            other_runs.setdefault(label, []).append(other)
            if compare and i == 0:
                comparisons[label] = compare_outputs(kept, work / f"out-adapterspec-{variant}")
                print(f"[{variant}] files of '{label}' against the default's: {comparisons[label]}", file=sys.stderr)
            shutil.rmtree(work / f"out-adapterspec-{variant}")
            print(f"[{variant}] run {i + 1}: adapterspec {label}: {other.wall_s:.2f} s ({other.cpu_s:.1f} s CPU, "
                  f"{other.peak_pss_mb:.0f} MB PSS), floor {floors[-1]:.2f} s", file=sys.stderr)  # fmt: skip
        if skip_mlx_lm:
            theirs.append(Run("mlx_lm fuse", variant, float("nan"), float("nan"), float("nan"), float("nan")))
            print(f"[{variant}] run {i + 1}: floor {floors[-1]:.2f} s, adapterspec {ours[-1].wall_s:.2f} s "
                  f"({ours[-1].cpu_s:.1f} s CPU, {ours[-1].peak_pss_mb:.0f} MB PSS)", file=sys.stderr)  # fmt: skip
            continue
        out = work / f"out-mlx-lm-{variant}"
        theirs.append(measure([sys.executable, "-m", "mlx_lm", "fuse", "--model", str(model_dir), "--adapter-path", str(adapter_dir), "--save-path", str(out)],
                              "mlx_lm fuse", variant))  # fmt: skip
        shutil.rmtree(out)
        print(f"[{variant}] run {i + 1}: floor {floors[-1]:.2f} s, adapterspec {ours[-1].wall_s:.2f} s "
              f"({ours[-1].cpu_s:.1f} s CPU), mlx_lm {theirs[-1].wall_s:.2f} s ({theirs[-1].cpu_s:.1f} s CPU)", file=sys.stderr)  # fmt: skip
    if trace:  # after the timed runs: the trace's own process measures where one more fuse spends its time
        ends = (("", {}), (", device files kept to the end", {"ADAPTERSPEC_HAND_OVER": "0"}),
                (", kept, leaving by os._exit", {"ADAPTERSPEC_HAND_OVER": "0", "FUSE_TRACE_HARD_EXIT": "1"}))  # fmt: skip
        for exit_note, env in ends:
            started = time.perf_counter()
            traced = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fuse_trace.py"), str(model_dir), str(adapter_dir),
                                     "-o", str(work / f"out-adapterspec-{variant}")], capture_output=True, text=True,
                                    env={**os.environ, **env})  # fmt: skip
            waited = time.perf_counter() - started
            print(f"[{variant}] where one fuse spends its time (benchmarks/fuse_trace.py{exit_note}):\n{traced.stdout}"
                  f"{traced.stderr[-2000:] if traced.returncode else ''}"
                  f"{'the process as its parent waited for it (its exit included)':<60} {waited:.3f} s", file=sys.stderr)  # fmt: skip
        shutil.rmtree(work / f"out-adapterspec-{variant}", ignore_errors=True)
    result = VariantResult(
        variant, sum(f.stat().st_size for f in weight_files) / 1e9, len(weight_files),
        max(f.stat().st_size for f in weight_files) / 2**20, (adapter_dir / "adapters.safetensors").stat().st_size / 2**20,
        min(floors), best(ours), best(theirs),
    )  # fmt: skip
    result.others = {label: best(runs) for label, runs in other_runs.items()}
    result.comparisons = comparisons
    shutil.rmtree(model_dir)
    shutil.rmtree(adapter_dir)
    if compare:
        shutil.rmtree(work / f"kept-{variant}", ignore_errors=True)
    return result


def compare_outputs(expected_dir: Path, got_dir: Path) -> dict:
    """How the tensors of two fused model directories differ: counts, ulps (floats), quantization steps."""
    import numpy as np

    from adapterspec.fuse.shards import read_sources

    def tensors(directory: Path) -> dict:
        found = {}
        for path in sorted(directory.glob("*.safetensors")):
            for name, source in read_sources(path).items():
                found[name] = np.memmap(path, dtype=np.uint8, mode="r", offset=source.offset, shape=(source.nbytes,))
        return found, {
            name: s for path in sorted(directory.glob("*.safetensors")) for name, s in read_sources(path).items()
        }

    (ours, meta), (theirs, _) = tensors(expected_dir), tensors(got_dir)
    summary = {"tensors": len(ours), "identical": 0, "float_values_differing": 0, "float_values": 0, "max_ulps": 0,
               "quantized_values_differing": 0, "quantized_values": 0, "max_steps": 0.0}  # fmt: skip
    if set(ours) != set(theirs):
        return {"error": "different tensor names"}
    float_views = {"float16": np.int16, "bfloat16": np.int16, "float32": np.int32}
    for name, raw in ours.items():
        other = theirs[name]
        if raw.shape == other.shape and np.array_equal(raw, other):
            summary["identical"] += 1
            continue
        dtype = meta[name].dtype
        owner, _, param = name.rpartition(".")
        if dtype in float_views and param not in ("scales", "biases"):
            a, b = raw.view(float_views[dtype]).astype(np.int64), other.view(float_views[dtype]).astype(np.int64)
            # Bit patterns of same-signed floats are ordered: their difference counts the representable values between.
            a = np.where(a < 0, -(a & (2 ** (8 * np.dtype(float_views[dtype]).itemsize - 1) - 1)), a)
            b = np.where(b < 0, -(b & (2 ** (8 * np.dtype(float_views[dtype]).itemsize - 1) - 1)), b)
            summary["float_values"] += a.size
            summary["float_values_differing"] += int(np.count_nonzero(a != b))
            summary["max_ulps"] = max(summary["max_ulps"], int(np.abs(a - b).max()))
        elif param == "weight" and f"{owner}.scales" in ours:
            ours_values = _dequantized(ours, owner, meta)
            theirs_values = _dequantized(theirs, owner, meta)
            step = np.repeat(
                _float(ours[f"{owner}.scales"], meta[f"{owner}.scales"].dtype),
                ours_values.size // meta[f"{owner}.scales"].shape[0] // meta[f"{owner}.scales"].shape[1],
            )
            summary["quantized_values"] += ours_values.size
            summary["quantized_values_differing"] += int(np.count_nonzero(ours_values != theirs_values))
            steps = np.abs(ours_values - theirs_values).reshape(-1) / np.maximum(np.abs(step), 1e-30)
            summary["max_steps"] = max(summary["max_steps"], float(steps.max()))
    return summary


def _float(raw, dtype: str):
    import numpy as np

    if dtype == "bfloat16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return raw.view({"float16": np.float16, "float32": np.float32}[dtype]).astype(np.float32)


def _dequantized(tensors: dict, owner: str, meta: dict):
    """An affine 4-bit (group 64) weight's values, as the benchmark's models are quantized."""
    import numpy as np

    words = tensors[f"{owner}.weight"].view(np.uint32)
    codes = ((words[:, None] >> (np.arange(8, dtype=np.uint32) * 4)) & 15).reshape(-1).astype(np.float32)
    scales = _float(tensors[f"{owner}.scales"], meta[f"{owner}.scales"].dtype)
    biases = _float(tensors[f"{owner}.biases"], meta[f"{owner}.biases"].dtype)
    return codes * np.repeat(scales, 64) + np.repeat(biases, 64)


def render(results: list[VariantResult]) -> str:
    lines = [
        "| model | size, files | floor (read + write) | adapterspec fuse: wall (CPU) | mlx_lm fuse: wall (CPU) "
        "| ours / mlx-lm | ours / floor | peak memory, RSS (PSS): ours | mlx-lm | bound |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        theirs = r.mlx_lm
        for label, ours in [("", r.adapterspec), *((f" ({label})", run) for label, run in r.others.items())]:
            lines.append(
                f"| {r.variant}{label} | {r.model_gb:.2f} GB, {r.shards} | {r.floor_s:.2f} s | {ours.wall_s:.2f} s ({ours.cpu_s:.1f} s) | "
                f"{theirs.wall_s:.2f} s ({theirs.cpu_s:.1f} s) | {ours.wall_s / theirs.wall_s:.2f} | {ours.wall_s / r.floor_s:.2f} | "
                f"{ours.peak_rss_mb:.0f} ({ours.peak_pss_mb:.0f}) MB | {theirs.peak_rss_mb:.0f} ({theirs.peak_pss_mb:.0f}) MB | {r.rss_bound_mb:.0f} MB |"
            )  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    global SAMPLE_SECONDS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="float16 model size (default 1.0)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--dtypes", default="float16,4bit", help="comma-separated: float16, 4bit")
    parser.add_argument("--runs", type=int, default=1, help="runs of each tool; the fastest counts")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--also", action="append", default=[], metavar="LABEL=ARGS",
        help="also time a variant of our fuse, e.g. 'plain=--requantize plain' or 'numpy=ADAPTERSPEC_FUSE_NATIVE=0'",
    )  # fmt: skip
    parser.add_argument("--skip-mlx-lm", action="store_true", help="time only adapterspec (and the floor)")
    parser.add_argument("--compare", action="store_true", help="compare each --also variant's files with the default's")
    parser.add_argument("--sample-seconds", type=float, default=SAMPLE_SECONDS,
                        help="how often the process tree's memory is read from /proc (0: never, wait4's peak only)")  # fmt: skip
    parser.add_argument("--trace", action="store_true", help="after the runs, time one fuse's stages (fuse_trace.py)")
    parser.add_argument("--write-model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write_model:
        model_dir = args.write_model / f"model-{args.variant}"
        write_model(model_dir, llama_config(args.layers), args.shards, quantize=args.variant == "4bit")
        write_adapters(model_dir, args.write_model / f"adapters-{args.variant}")
        return 0
    layers = layers_for(args.size_gb)
    SAMPLE_SECONDS = args.sample_seconds
    device = subprocess.run([sys.executable, "-c", "import mlx.core as mx; print(mx.__version__, mx.default_device())"],
                            capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    print(
        f"mlx {device}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", file=sys.stderr
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="adapterspec-fuse-bench-") as work:
        for variant in args.dtypes.split(","):
            others = [parse_other(text) for text in args.also]
            results.append(
                bench_variant(
                    Path(work),
                    variant.strip(),
                    layers,
                    args.shards,
                    args.runs,
                    others,
                    args.skip_mlx_lm,
                    args.compare,
                    args.trace,
                )  # fmt: skip
            )
    print(render(results))
    for r in results:
        ok_speed = r.adapterspec.wall_s <= GOAL_RATIO_TO_MLX_LM * r.mlx_lm.wall_s
        ok_floor = r.adapterspec.wall_s <= GOAL_RATIO_TO_FLOOR * r.floor_s
        ok_rss = r.adapterspec.peak_pss_mb <= r.rss_bound_mb
        speed = "not measured" if args.skip_mlx_lm else "yes" if ok_speed else "NO"
        gpu_goal = GPU_GOAL_RATIO_TO_FLOOR.get(r.variant, GOAL_RATIO_TO_FLOOR)
        ok_gpu = r.adapterspec.wall_s <= gpu_goal * r.floor_s
        print(f"{r.variant}: ≤ 1/3 of mlx_lm: {speed}; ≤ 2× floor: {'yes' if ok_floor else 'NO'}; "
              f"≤ {gpu_goal}× floor (the GPU goal): {'yes' if ok_gpu else 'no'}; "
              f"memory (PSS) within bound: {'yes' if ok_rss else 'NO'}")  # fmt: skip
        for label, comparison in r.comparisons.items():
            print(f"{r.variant}: files of '{label}' against the default's: {json.dumps(comparison)}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {"rss_bound_mb": r.rss_bound_mb, "mlx": device} for r in results],
                                        indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
