"""Vision-language models built by mlx-vlm: the model and its processor from a model directory; a missing mlx-vlm
is a user error naming the extra."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserError
from ..model.vlm import VLM_EXTRA_HELP


def require_mlx_vlm(path: Path, config: dict) -> None:
    """A UserError naming the extra to install when mlx-vlm is missing."""
    try:
        import mlx_vlm  # noqa: F401
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] != "mlx_vlm":
            raise
        raise UserError(
            f"{path}: model_type {config.get('model_type')!r} is a vision-language model, which needs mlx-vlm",
            help=VLM_EXTRA_HELP,
        ) from None


def load_vlm_model(path: Path, config: dict, lazy: bool = False) -> tuple[Any, dict]:
    """(model, config) of a vision-language model directory, built by mlx-vlm as `mlx_vlm.load` builds it (its
    failures reach `loading.load_model`, which words them)."""
    require_mlx_vlm(path, config)
    from mlx_vlm.utils import load_model as mlx_vlm_load_model

    return mlx_vlm_load_model(Path(path), lazy=lazy), config


def load_vlm_processor(path: Path, config: dict) -> Any:
    """mlx-vlm's processor of a model directory (tokenizer, image processor, chat template; no download)."""
    require_mlx_vlm(path, config)
    from mlx_vlm.utils import load_processor

    try:
        return load_processor(Path(path), True, eos_token_ids=config.get("eos_token_id"))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"{path}: cannot load the processor: {error}",
            help="the directory needs the tokenizer and preprocessor_config.json files mlx-vlm's processor reads",
        ) from error
