"""Model directories on disk: config.json, the weight files and their index, local lookup (the Hugging Face cache), side files."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from ..errors import UserError
from ..inputs import check_regular_file
from ..jsonfile import read_json
from .config import check_model_config
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
    if os.path.lexists(index_path):
        return _shard_paths(model_dir, read_weight_map(model_dir))
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise UserError(
            f"{model_dir}: no model*.safetensors weights",
            help="point at an mlx-lm model directory (convert other formats with `mlx_lm.convert`)",
        )
    for path in files:
        check_regular_file(path)
    return files


def read_weight_map(model_dir: str | os.PathLike) -> dict[str, str]:
    """The index's weight_map (tensor name → shard file name), checked: names are files inside the directory."""
    model_dir = Path(model_dir)
    index_path = model_dir / WEIGHT_INDEX_FILE
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise UserError(f"{index_path}: no 'weight_map' object in the index", help="the model directory is damaged")
    if not all(type(name) is str for name in weight_map.values()):
        tensor, name = next((t, n) for t, n in weight_map.items() if type(n) is not str)
        _check_shard_name(index_path, tensor, name)
    for name in set(weight_map.values()):
        _check_shard_name(index_path, next(t for t, n in weight_map.items() if n == name), name)
    for name in sorted(set(weight_map.values())):
        shard = model_dir / name
        if not os.path.lexists(shard):
            raise UserError(
                f"{model_dir}: weight shard {name} named in {WEIGHT_INDEX_FILE} is missing",
                help="the download or conversion is incomplete",
            )
        check_regular_file(shard)
    return weight_map


def _shard_paths(model_dir: Path, weight_map: dict[str, str]) -> list[Path]:
    return [model_dir / name for name in sorted(set(weight_map.values()))]


def _check_shard_name(index_path: Path, tensor: str, name: object) -> None:
    """A weight_map entry must name a file in the model directory itself."""
    if not isinstance(name, str):
        raise UserError(
            f"{index_path}: weight_map['{tensor}'] is {json.dumps(name)}, not a file name",
            help="every weight_map entry names the shard file that holds the tensor",
        )
    if name in ("", ".", "..") or any(c in name for c in "/\\\0") or os.path.isabs(name):
        raise UserError(
            f"{index_path}: weight_map['{tensor}'] is {name!r}, which is not a file inside the model directory",
            help="shards must lie in the model directory itself; the index is damaged or was not made for it",
        )


def read_model_tensors(model_dir: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor of a model directory, over all of its shards."""
    return {name: info for name, (_, info) in read_model_weights(model_dir).items()}


def read_model_weights(model_dir: str | os.PathLike) -> dict[str, tuple[Path, TensorInfo]]:
    """Every tensor of a model directory with the shard holding it, checked against the index when there is one.

    A tensor held by two shards, or an index entry naming a shard that does not hold the tensor, is refused."""
    model_dir = Path(model_dir)
    weight_map = read_weight_map(model_dir) if os.path.lexists(model_dir / WEIGHT_INDEX_FILE) else None
    found: dict[str, tuple[Path, TensorInfo]] = {}
    for path in weight_files(model_dir) if weight_map is None else _shard_paths(model_dir, weight_map):
        for name, info in read_safetensors_header(path).items():
            if name in found:
                raise UserError(
                    f"{model_dir}: tensor '{name}' is stored twice, in {found[name][0].name} and in {path.name}",
                    help="each tensor belongs in one shard; the conversion is damaged, convert the model again",
                )
            found[name] = (path, info)
    if weight_map is not None:
        _check_index_against_shards(model_dir, weight_map, found)
    return found


def _check_index_against_shards(model_dir: Path, weight_map: dict[str, str], found: dict) -> None:
    index_path = model_dir / WEIGHT_INDEX_FILE
    for tensor, name in weight_map.items():
        where = found.get(tensor)
        if where is None or where[0].name != name:
            holder = f"{name} does not hold it" if where is None else f"it is in {where[0].name}"
            raise UserError(
                f"{index_path}: weight_map puts tensor '{tensor}' in {name}, but {holder}",
                help="the index does not describe the shards; convert or download the model again",
            )


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
    return check_model_config(read_json(path), path)


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
