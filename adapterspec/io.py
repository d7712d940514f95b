"""Model and adapter directories on disk: safetensors headers, local model lookup, loading, atomic writes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from adapterspec.errors import UserError

CONFIG_FILE = "config.json"
WEIGHT_INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype codes → (mlx dtype name, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "U16": ("uint16", 2),
    "I16": ("int16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "U32": ("uint32", 4),
    "I32": ("int32", 4),
    "F32": ("float32", 4),
    "C64": ("complex64", 8),
    "U64": ("uint64", 8),
    "I64": ("int64", 8),
    "F64": ("float64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".npz", ".h5", ".msgpack", ".onnx")
WEIGHT_INDEX_PATTERN = re.compile(r".*\.(safetensors|bin|pt|pth)\.index\.json$")
HF_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ModelNotFound(UserError):
    """Neither a local model directory nor a model in the local Hugging Face cache."""


class CorruptWeightFile(UserError):
    """A safetensors file whose header cannot be read."""


class ModelLoadError(UserError):
    """mlx-lm could not build the model from its directory."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: dtype code ("F32"), shape, byte offsets in the data section."""

    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]

    @property
    def dtype_name(self) -> str:
        """The dtype as mlx names it ("float32")."""
        return SAFETENSORS_DTYPES[self.dtype][0]

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def ndim(self) -> int:
        return len(self.shape)


# ── safetensors headers ─────────────────────────────────────────────────────


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file, read from its header only (pure Python)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            file_size = os.fstat(f.fileno()).st_size
            if len(head) < 8:
                raise _corrupt(path, "the file is shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
                raise _corrupt(path, f"the header length {header_len} does not fit in a file of {file_size} bytes")
            raw = f.read(header_len)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"the header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    return _tensor_infos(path, header, file_size - 8 - header_len)


def _tensor_infos(path: Path, header: dict, data_size: int) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise _corrupt(path, f"tensor {name!r} has no valid dtype/shape/data_offsets") from e
        if dtype not in SAFETENSORS_DTYPES:
            raise _corrupt(path, f"tensor {name!r} has unknown dtype {dtype!r}")
        info = TensorInfo(dtype, shape, (start, end))
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not (0 <= start <= end <= data_size):
            raise _corrupt(path, f"tensor {name!r} has invalid shape or offsets (the file may be truncated)")
        if end - start != info.size * SAFETENSORS_DTYPES[dtype][1]:
            raise _corrupt(path, f"tensor {name!r}: its offsets do not match its shape and dtype")
        tensors[name] = info
    return tensors


def _corrupt(path: Path, why: str) -> CorruptWeightFile:
    return CorruptWeightFile(
        f"{path}: not a valid safetensors file: {why}",
        help="the file may be truncated or damaged; download or convert the model again",
    )


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
        raise ModelNotFound(f"{text}: no such directory", help="give a model directory or a Hugging Face repo id (org/name)")
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


# ── loading with mlx-lm (imports mlx lazily) ────────────────────────────────


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
        raise UserError(f"{path}: cannot load the tokenizer: {e}", help="the directory needs tokenizer.json or tokenizer.model") from e


# ── writing ─────────────────────────────────────────────────────────────────


@contextlib.contextmanager
def atomic_output_dir(
    dest: str | os.PathLike, force: bool = False, protect: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield a temporary directory that becomes `dest` only when the block succeeds; removed otherwise."""
    dest = Path(dest).expanduser().absolute()
    _check_destination(dest, force, protect)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_temp_dir(dest.parent, f".{dest.name}.tmp-")
    try:
        yield tmp
        _move_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new directory with a random name, made by plain mkdir so that it gets the umask's mode (not 0700)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {parent}")


def _check_destination(dest: Path, force: bool, protect: Iterable[str | os.PathLike]) -> None:
    real_dest = dest.resolve()
    for item in protect:
        guarded = Path(item).expanduser().resolve()
        if real_dest == guarded or guarded in real_dest.parents or real_dest in guarded.parents:
            raise UserError(
                f"refusing to write to {dest}: it overlaps the input directory {guarded}",
                help="choose an output directory outside the model and adapter directories",
            )
    if dest.exists() and not dest.is_dir():
        raise UserError(f"refusing to write to {dest}: it exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise UserError(f"refusing to overwrite {dest}: the directory is not empty", help="pass --force to replace it")


def _move_into_place(tmp: Path, dest: Path) -> None:
    if not dest.exists():
        os.rename(tmp, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    old.rmdir()
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int = 4) -> None:
    """Write JSON to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def is_side_file(name: str) -> bool:
    """Whether a file of a model directory travels with the model: not weights, index, config or hidden."""
    if name.startswith(".") or name == CONFIG_FILE:
        return False
    return not (name.endswith(WEIGHT_SUFFIXES) or WEIGHT_INDEX_PATTERN.match(name))


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
