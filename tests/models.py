"""Tiny real mlx-lm models for tests: build in memory, write in mlx-lm's layout, load back through adapterspec.model.files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_MODELS_DIR = ROOT / "examples" / "models"


def _load_builder():
    """The shared builder, examples/models/make_models.py, imported by path (examples/ is no package)."""
    name = "adapterspec_example_models"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE_MODELS_DIR / "make_models.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


builder = _load_builder()
ARCHITECTURES = tuple(builder.TINY_CONFIGS)
EXAMPLE_MODELS = tuple(builder.EXAMPLE_MODELS)
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe")
Q4 = {"group_size": 32, "bits": 4, "mode": "affine"}
tiny_config = builder.tiny_config
write_tokenizer = builder.write_tokenizer


def build(arch: str, *, quantization: dict | None = None, dtype: str = "float32", seed: int = 0, **overrides: Any):
    """(model, config): a tiny `arch` model with random weights; quantized as mlx-lm converts when asked."""
    return builder.build(arch, quantization=quantization, dtype=dtype, seed=seed, **overrides)


def write(path: str | Path, arch: str, *, with_tokenizer: bool = True, **build_args: Any) -> Path:
    """Build a tiny `arch` model and write it to `path` as an mlx-lm model directory; returns the path."""
    model, config = build(arch, **build_args)
    return builder.save_model_dir(model, config, Path(path), with_tokenizer=with_tokenizer)


def save(path: str | Path, model, config: dict, *, with_tokenizer: bool = True) -> Path:
    """Write an existing model and its config to `path` in mlx-lm's layout."""
    return builder.save_model_dir(model, config, Path(path), with_tokenizer=with_tokenizer)


def load(path: str | Path, lazy: bool = False):
    """(model, config) of a model directory, through adapterspec.model.files.load_model."""
    from adapterspec.adapters.loading import load_model

    return load_model(path, lazy=lazy)


def example_model_dir(name: str) -> Path:
    """The committed example model directory `name` (tiny-llama, tiny-moe, tiny-llama-4bit)."""
    path = EXAMPLE_MODELS_DIR / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is missing; run `python examples/models/make_models.py`")
    return path
