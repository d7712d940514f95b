"""Outputs written atomically: a directory or a file appears whole at its destination, or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import UserError


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


def write_file_atomic(path: str | os.PathLike, content: bytes | str, mode: int | None = None) -> None:
    """Write `content` to a temporary file beside `path` (flushed to disk), then rename it over `path`.

    A link is followed, so the file it points to is replaced; `mode` sets the permissions (else the umask's)."""
    target = Path(os.path.realpath(path))
    data = content.encode("utf-8") if isinstance(content, str) else content
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode if mode is not None else 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def copy_file_atomic(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copy `source` over `path` through a temporary file beside it."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int = 4) -> None:
    """`data` as JSON (UTF-8, a newline at the end), written atomically."""
    write_file_atomic(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
