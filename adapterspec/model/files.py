"""Model directories on disk: config.json, the weight files and their index, local lookup (the Hugging Face cache), side files."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ..errors import UserError
from .safetensors import TensorInfo, read_safetensors_header

CONFIG_FILE = "config.json"
WEIGHT_INDEX_FILE = "model.safetensors.index.json"


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".npz", ".h5", ".msgpack", ".onnx")
WEIGHT_INDEX_PATTERN = re.compile(r".*\.(safetensors|bin|pt|pth)\.index\.json$")
HF_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ModelNotFound(UserError):
    """Neither a local model directory nor a model in the local Hugging Face cache."""


# ── safetensors headers ─────────────────────────────────────────────────────


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model directory: those of its index, or model*.safetensors."""
    model_dir = Path(model_dir)
    index_path = model_dir / WEIGHT_INDEX_FILE
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise UserError(f"{index_path}: no 'weight_map' in the index", help="the model directory is damaged")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(
                f"{model_dir}: weight shard(s) named in {WEIGHT_INDEX_FILE} are missing: {', '.join(missing)}",
                help="the download or conversion is incomplete",
            )
        return files
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise UserError(
            f"{model_dir}: no model*.safetensors weights",
            help="point at an mlx-lm model directory (convert other formats with `mlx_lm.convert`)",
        )
    return files


def read_model_tensors(model_dir: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor of a model directory, over all of its shards."""
    tensors: dict[str, TensorInfo] = {}
    for path in weight_files(model_dir):
        tensors.update(read_safetensors_header(path))
    return tensors


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise UserError(f"{path}: no such file") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read JSON: {e}") from e


def read_model_config(model_dir: str | os.PathLike) -> dict:
    """config.json of a model directory, with a clear error when it is missing or broken."""
    model_dir = Path(model_dir)
    path = model_dir / CONFIG_FILE
    if not model_dir.is_dir():
        raise ModelNotFound(f"{model_dir}: no such directory")
    if not path.is_file():
        raise UserError(
            f"{model_dir}: no {CONFIG_FILE}",
            help="a model directory holds config.json and model*.safetensors, as mlx-lm writes them",
        )
    config = read_json(path)
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a JSON object")
    return config


# ── finding models ──────────────────────────────────────────────────────────


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache directory, as huggingface_hub resolves it from the environment."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def resolve_model_path(name_or_path: str | os.PathLike, revision: str = "main") -> Path:
    """A local model directory, or the local-cache snapshot of a Hugging Face repo id; never downloads."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFound(f"{text}: not a directory", help="give the model's directory, not one of its files")
    if not HF_REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise ModelNotFound(
            f"{text}: no such directory", help="give a model directory or a Hugging Face repo id (org/name)"
        )
    return _cached_snapshot(text, revision)


def _cached_snapshot(repo_id: str, revision: str) -> Path:
    cache = hf_cache_dir()
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    not_cached = ModelNotFound(
        f"{repo_id}: not a local directory and not in the local Hugging Face cache ({cache})",
        help=f"download it first (e.g. `huggingface-cli download {repo_id}`) or give a local model directory",
    )
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        raise not_cached
    ref = repo_dir / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
    elif (snapshots / revision).is_dir():
        commit = revision
    else:
        available = sorted(p.name for p in snapshots.iterdir() if p.is_dir())
        if len(available) != 1:
            raise ModelNotFound(
                f"{repo_id}: the local cache has no snapshot for revision {revision!r}",
                help=f"cached snapshots: {', '.join(available) or 'none'}",
            )
        commit = available[0]
    snapshot = snapshots / commit
    if not (snapshot / CONFIG_FILE).is_file():
        raise ModelNotFound(
            f"{repo_id}: the cached snapshot {commit[:12]} has no {CONFIG_FILE}",
            help="the download is incomplete; download the model again",
        )
    return snapshot


# ── writing ─────────────────────────────────────────────────────────────────


def is_side_file(name: str) -> bool:
    """Whether a file of a model directory travels with the model: not weights, index, config or hidden."""
    if name.startswith(".") or name == CONFIG_FILE:
        return False
    return not (name.endswith(WEIGHT_SUFFIXES) or WEIGHT_INDEX_PATTERN.match(name))


def side_files(model_dir: str | os.PathLike) -> list[str]:
    """The names of a model directory's side files (what `copy_model_side_files` copies)."""
    return sorted(item.name for item in Path(model_dir).iterdir() if is_side_file(item.name))


def copy_model_side_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy tokenizer files, generation config, chat template etc. from src to dst; return their names."""
    src, dst = Path(src), Path(dst)
    copied = []
    for item in sorted(src.iterdir()):
        if not is_side_file(item.name):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))
        else:
            shutil.copyfile(item, dst / item.name)
        copied.append(item.name)
    return copied
