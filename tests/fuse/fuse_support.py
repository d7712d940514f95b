"""Shared pieces of the fuse tests (no tests here): adapter directories as if trained, reference fuses, fused models read back."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlx.core as mx
import models as tiny
from mlx.utils import tree_flatten, tree_unflatten

from adapterspec.adapters.install import apply
from adapterspec.adapters.weights import load_adapters, save_adapters
from adapterspec.model.adapter_format import ADAPTER_CONFIG

MIXED_SPEC = """adapterspec 1

layers[*].self_attn.<q,v>_proj: lora(r=4, scale=2.0)
layers[*].mlp.down_proj: dora(r=4)
embed_tokens: lora(r=4)
**.*norm: full
"""
MLX_LM_SPEC = """adapterspec 1

layers[-3:].self_attn.<q,v>_proj: lora(r=4, scale=2.0)
layers[-3:].mlp.<gate,up,down>_proj: lora(r=4, scale=2.0)
"""
MOE_SPEC = """adapterspec 1

layers[*].block_sparse_moe.switch_mlp.<gate,up,down>_proj: lora(r=4, scale=2.0)
layers[*].self_attn.q_proj: lora(r=4, scale=2.0)
"""


def write_adapters(model_dir: Path, out: Path, spec: str, *, b_scale=0.05, b_scales: dict | None = None, seed: int = 1,
                   mlx_lm_only: bool = False) -> Path:  # fmt: skip
    """An adapter directory for `spec` on the model, with random nonzero B (scaled per module name if asked),
    changed DoRA magnitudes and changed `full` weights, as if trained."""
    model, _ = tiny.load(model_dir)
    mx.random.seed(seed)
    plan = apply(model, spec)
    updates = []
    for name, value in tree_flatten(model.trainable_parameters()):
        if name.endswith(".lora_b"):
            scale = next((s for key, s in (b_scales or {}).items() if key in name), b_scale)
            value = mx.random.normal(value.shape) * scale
        elif name.endswith(".m"):
            value = value * (1 + 0.1 * mx.random.normal(value.shape))
        elif not name.endswith(".lora_a"):
            value = (value.astype(mx.float32) + 0.1 * mx.random.normal(value.shape)).astype(value.dtype)
        updates.append((name, value))
    model.load_weights(updates, strict=False)
    save_adapters(model, plan, out)
    if mlx_lm_only:
        config = json.loads((out / ADAPTER_CONFIG).read_text())
        assert "fine_tune_type" in config, "the plan must fit mlx-lm's format"
        del config["adapterspec"]
        (out / ADAPTER_CONFIG).write_text(json.dumps(config))
    return out


def fuse_in_memory(model_dir: Path, adapter_dir: Path, *, dequantize: bool = False, dense_paths=()) -> dict:
    """The reference weights: load the model and adapters, replace every adapter by its own `.fuse()`."""
    return dict(
        tree_flatten(
            fused_model_in_memory(model_dir, adapter_dir, dequantize=dequantize, dense_paths=dense_paths).parameters()
        )
    )


def fused_model_in_memory(model_dir: Path, adapter_dir: Path, *, dequantize: bool = False, dense_paths=()):
    """The reference model: the adapters' own `.fuse()` (dequantized for `dense_paths`), as mlx_lm fuse does it."""
    model, _ = tiny.load(model_dir)
    load_adapters(model, adapter_dir)
    fused = [
        (name, module.fuse(dequantize=dequantize or name in dense_paths))
        for name, module in model.named_modules()
        if hasattr(module, "lora_a")
    ]
    model.update_modules(tree_unflatten(fused))
    if dequantize:
        from mlx_lm.utils import dequantize_model

        model = dequantize_model(model)
    return model


def fuse_with_mlx_lm(model_dir: Path, adapter_dir: Path, *, dequantize: bool = False) -> dict:
    """What `mlx_lm fuse` computes: its loader, its adapters' fuse, its dequantize_model."""
    from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters
    from mlx_lm.utils import dequantize_model, load_model

    model, _ = load_model(Path(model_dir))
    model = mlx_lm_load_adapters(model, str(adapter_dir))
    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
    return dict(tree_flatten(model.parameters()))


def read_weights(model_dir: Path) -> dict:
    """Every tensor of a fused model directory, through its index."""
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    weights = {}
    for filename in sorted(set(index["weight_map"].values())):
        weights.update(mx.load(str(model_dir / filename)))
    assert set(weights) == set(index["weight_map"])
    return weights


def tree_hash(path: Path) -> str:
    """A hash of every file's relative name and bytes under `path`."""
    digest = hashlib.sha256()
    for item in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(item.relative_to(path)).encode())
        digest.update(item.read_bytes())
    return digest.hexdigest()


def write_sharded(model, config: dict, path: Path, shards: int, with_tokenizer: bool = True) -> Path:
    """A model directory whose weights are split over `shards` files (mlx-lm only splits at whole gigabytes)."""
    from adapterspec.fuse.shards import ShardWriter

    path.mkdir(parents=True)
    weights = list(tree_flatten(model.parameters()))
    limit = sum(v.nbytes for _, v in weights) / shards * 1.05
    groups, size = [], 0
    for name, value in weights:
        if not groups or size + value.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append((name, value))
        size += value.nbytes
    weight_map = {}
    for i, group in enumerate(groups):
        filename = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        entries = [(n, str(v.dtype).rsplit(".", 1)[-1], tuple(v.shape)) for n, v in group]
        writer = ShardWriter(path / filename, entries, {"format": "mlx"})
        for name, value in group:
            mx.eval(value)
            writer.write(name, [value])
            weight_map[name] = filename
        writer.close()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))
    if with_tokenizer:
        tiny.write_tokenizer(path, config["vocab_size"])
    return path
