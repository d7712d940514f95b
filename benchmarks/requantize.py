"""How much of a small adapter each way of storing a fused quantized model keeps, measured with `fuse --verify`.

A llama with random weights, quantized to 4 bits, gets LoRA adapters on every linear whose change ΔW is a given
fraction of the quantization step (RMS of ΔW over the median step |scale|, as after a short training). Each storing
mode fuses them and the fused model is run against the adapted one on the same sampled tokens:

    plain  every group requantized afresh (mlx_lm fuse)      grid   on the base's own grid (the default)
    fit    --keep-precision fit (finer bits per module)     auto   --keep-precision auto (unquantized per module)
    dense  --dequantize

    python benchmarks/requantize.py                         # hidden 512, 4 blocks, 4-bit g32 and g64, float32
    python benchmarks/requantize.py --dtype float16         # float16 scales (slow on a CPU: its quantized matmul)
    python benchmarks/requantize.py --ratios 0.05,0.2,0.5,1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SPEC = """adapterspec 1

layers[*].self_attn.<q,k,v,o>_proj: lora(r=8, scale=20.0)
layers[*].mlp.<gate,up,down>_proj: lora(r=8, scale=20.0)
"""
MODES = {
    "plain": {"requantization": "plain"},
    "grid": {},
    "fit": {"keep_precision": "fit"},
    "auto": {"keep_precision": "auto"},
    "dense": {"dequantize": True},
}


def write_model(path: Path, hidden: int, layers: int, vocab: int, group_size: int, bits: int, dtype: str) -> Path:
    import mlx.core as mx
    from mlx_lm.models import llama
    from mlx_lm.utils import quantize_model, save_config, save_model

    config = {
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": 3 * hidden, "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 128, "rms_norm_eps": 1e-5,
        "vocab_size": vocab, "rope_theta": 10000.0, "tie_word_embeddings": False,
    }  # fmt: skip
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(getattr(mx, dtype))
    model, config = quantize_model(model, config, group_size, bits)
    path.mkdir(parents=True)
    save_model(path, model)
    save_config(config, path / "config.json")
    return path


def write_adapters(model_dir: Path, out: Path, ratio: float) -> float:
    """Adapters whose ΔW has RMS `ratio` × the median quantization step; returns the ratio measured."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from adapterspec.adapters.install import apply
    from adapterspec.adapters.loading import load_model
    from adapterspec.adapters.weights import save_adapters

    model, _ = load_model(model_dir)
    mx.random.seed(1)
    plan = apply(model, SPEC)
    params = dict(tree_flatten(model.trainable_parameters()))
    b = {name: mx.random.normal(value.shape) for name, value in params.items() if name.endswith(".lora_b")}
    probe = "model.layers.0.self_attn.q_proj"
    delta = 20.0 * (params[f"{probe}.lora_a"] @ b[f"{probe}.lora_b"])
    step = mx.median(mx.abs(dict(tree_flatten(model.parameters()))[f"{probe}.linear.scales"].astype(mx.float32)))
    factor = ratio * step.item() / mx.sqrt(mx.mean(delta * delta)).item()
    model.load_weights([(name, value * factor) for name, value in b.items()], strict=False)
    save_adapters(model, plan, out)
    return ratio


def run(args) -> list[dict]:
    from adapterspec.fuse.run import fuse_model_dir
    from adapterspec.fuse.verify import sample_sequences

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for group_size in args.group_sizes:
            model = write_model(
                root / f"model-g{group_size}", args.hidden, args.layers, args.vocab, group_size, 4, args.dtype
            )
            tokens = (sample_sequences(model, args.sequences, args.length), "sampled from the vocabulary")
            for ratio in args.ratios:
                adapters = root / f"adapters-g{group_size}-{ratio}"
                write_adapters(model, adapters, ratio)
                for mode, options in MODES.items():
                    out = root / f"out-{mode}"
                    started = time.monotonic()
                    result = fuse_model_dir(model, adapters, out, verify=tokens, **options)
                    seconds = time.monotonic() - started
                    v = result.verified
                    stored = sorted({m.stored for m in result.report.modules})
                    rows.append({
                        "group_size": group_size, "ratio": ratio, "mode": mode, "stored": stored,
                        "weights_mb": sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6,
                        "kept": v.kept, "error": v.error, "status": v.status,
                        "top1": v.fused.top1_agreement, "kl_mean": v.fused.kl_mean, "kl_max": v.fused.kl_max,
                        "base_top1": v.base.top1_agreement, "base_kl_mean": v.base.kl_mean,
                        "erasure": json.dumps({k: n for k, n in result.report.to_json()["counts"].items() if n}),
                        "seconds": seconds,
                    })  # fmt: skip
                    print(_line(rows[-1]), flush=True)
                    shutil.rmtree(out)
    return rows


def _line(r: dict) -> str:
    return (
        f"| 4-bit g{r['group_size']} | {r['ratio']:g} | {r['mode']} | {', '.join(r['stored'])} | {r['weights_mb']:.1f} | "
        f"{100 * r['kept']:.0f}% | {r['error']:.2f} | {r['status']} | {100 * r['top1']:.1f}% | {r['kl_mean']:.2e} | "
        f"{100 * r['base_top1']:.1f}% | {r['base_kl_mean']:.2e} | {r['erasure']} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--group-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[32, 64])
    parser.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.05, 0.2, 0.5, 1.0])
    # MLX's CPU quantized matmul is ~20x slower with float16 scales than with float32 ones: float32 by default.
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--json", help="also write the rows as JSON")
    args = parser.parse_args()
    print("| base | ΔW / step | mode | stored as | weights MB | effect kept | error | verify | top-1 | KL mean | "
          "base top-1 | base KL mean | erasure report |")  # fmt: skip
    print("| --- " * 13 + "|")
    rows = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
