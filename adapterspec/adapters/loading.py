"""Live models: a model directory built into an mlx-lm model (and its tokenizer), with user errors for the usual failures."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..model.files import (
    CONFIG_FILE,
    read_model_config,
    resolve_model_path,
    weight_files,
)


class ModelLoadError(UserError):
    """mlx-lm could not build the model from its directory."""


def load_model(path: str | os.PathLike, lazy: bool = False) -> tuple[Any, dict]:
    """(model, config) of a model directory, through mlx-lm, with user errors for the usual failures."""
    path = resolve_model_path(path)
    config = read_model_config(path)
    if "model_type" not in config:
        raise ModelLoadError(f"{path / CONFIG_FILE}: no 'model_type'", help="config.json must name the architecture")
    weight_files(path)
    from mlx_lm.utils import load_model as mlx_lm_load_model

    try:
        return mlx_lm_load_model(path, lazy=lazy)
    except ValueError as e:
        raise _load_error(path, config, e) from e
    except (KeyError, TypeError, FileNotFoundError) as e:
        raise ModelLoadError(
            f"{path}: mlx-lm cannot build the model: {type(e).__name__}: {e}",
            help="check config.json against the model type's parameters",
        ) from e


def _load_error(path: Path, config: dict, error: ValueError) -> ModelLoadError:
    text = str(error)
    if "not supported" in text and "Model type" in text:
        return ModelLoadError(
            f"{path}: model type {config.get('model_type')!r} is not supported by the installed mlx-lm",
            help="upgrade mlx-lm, or check 'model_type' in config.json",
        )
    if "shape" in text.lower():
        return ModelLoadError(
            f"{path}: the weights do not fit the architecture in config.json: {text}",
            help="config.json and the safetensors files come from different models, or the conversion failed",
        )
    return ModelLoadError(f"{path}: mlx-lm cannot load the model: {text}")


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
