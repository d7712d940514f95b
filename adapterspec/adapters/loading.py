"""Live models: a model directory built into an mlx-lm model (and its tokenizer), with user errors for the usual failures;
a vision-language model directory is built by mlx-vlm (`adapters.vlm`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..model.files import CONFIG_FILE, read_model_config, resolve_model_path
from ..model.index import ModuleIndex
from ..model.vlm import is_vlm_dir


class ModelLoadError(UserError):
    """mlx-lm could not build the model from its directory."""


# What mlx-lm (and mlx under it) raise on a config or weights it cannot build: a bad value divides by zero, a
# module without Model, a missing field, a shape mismatch, a damaged file.
MLX_LM_ERRORS = (
    ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError, IndexError, OverflowError, RuntimeError,
    FileNotFoundError, ImportError,
)  # fmt: skip


def load_model(path: str | os.PathLike, lazy: bool = False) -> tuple[Any, dict]:
    """(model, config) of a model directory, through mlx-lm (mlx-vlm for a vision-language model), with user
    errors for the usual failures.

    config.json, the index and every safetensors header are checked first (as `tree` reads them), so mlx-lm
    only ever sees a directory whose files are whole and agree with each other."""
    path = resolve_model_path(path)
    index = ModuleIndex.from_model_dir(path)
    config = read_model_config(path)
    if is_vlm_dir(config, index):
        from .vlm import load_vlm_model

        try:
            return load_vlm_model(path, config, lazy=lazy)
        except MLX_LM_ERRORS as e:
            raise _load_error(path, config, e, "mlx-vlm") from e
    from mlx_lm.utils import load_model as mlx_lm_load_model

    try:
        return mlx_lm_load_model(path, lazy=lazy)
    except MLX_LM_ERRORS as e:
        raise _load_error(path, config, e) from e


def _load_error(path: Path, config: dict, error: Exception, loader: str = "mlx-lm") -> ModelLoadError:
    text = f"{type(error).__name__}: {error}" if not isinstance(error, ValueError) else str(error)
    what = f"{path}: {loader} cannot build model_type {config.get('model_type')!r}"
    if "not supported" in text and "Model type" in text:
        return ModelLoadError(
            f"{what}: the installed {loader} does not support it",
            help=f"upgrade {loader}, or check 'model_type' in config.json",
        )
    if "shape" in text.lower():
        return ModelLoadError(
            f"{what}: the weights do not fit the architecture in {CONFIG_FILE}: {text}",
            help="config.json and the safetensors files come from different models, or the conversion failed",
        )
    return ModelLoadError(
        f"{what}: {text}", help=f"check {path / CONFIG_FILE} against the model type's parameters, or convert it again"
    )


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The mlx-lm tokenizer wrapper of a model directory (no download)."""
    path = resolve_model_path(path)
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    try:
        return mlx_lm_load_tokenizer(path)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            f"{path}: cannot load the tokenizer: {e}", help="the directory needs tokenizer.json or tokenizer.model"
        ) from e


def vision_language(model: Any, config: dict) -> bool:
    """Whether a model load_model built is a vision-language model (built by mlx-vlm)."""
    return is_vlm_dir(config, ModuleIndex.from_module(model))


def load_processor(path: str | os.PathLike, config: dict) -> Any:
    """mlx-vlm's processor of a vision-language model directory (tokenizer, image processor; no download)."""
    from .vlm import load_vlm_processor

    return load_vlm_processor(resolve_model_path(path), config)
