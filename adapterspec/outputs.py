"""Outputs written atomically: a directory or a file appears whole at its destination, or not at all."""

from __future__ import annotations

import contextlib
import fnmatch
import glob
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
    dest: str | os.PathLike,
    force: bool = False,
    protect: Iterable[str | os.PathLike] = (),
    produces: Iterable[str] = ("*",),
) -> Iterator[Path]:
    """Yield a temporary directory beside `dest` that becomes `dest` only when the block succeeds; removed otherwise.

    `produces` are the names (fnmatch patterns) of what the command writes: with `force`, a non-empty `dest` is
    replaced only when it holds nothing else, so that a previous output of the same command can be replaced
    but no file of the user's is ever deleted. Temporary directories left beside `dest` by a killed process
    (their names carry its pid) are removed first."""
    dest = Path(dest).expanduser().absolute()
    produces = tuple(produces)
    check_output_dir(dest, force=force, protect=protect, produces=produces)
    remove_stale_temporaries(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_temp_dir(dest.parent, f".{dest.name}.tmp-{os.getpid()}-")
    try:
        yield tmp
        _move_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(
    dest: str | os.PathLike, *, force: bool, protect: Iterable[str | os.PathLike] = (), produces: Iterable[str] = ("*",)
) -> None:
    """Refuse, before any work, an output directory that overlaps an input, is a file, or holds files the command
    would not replace (a non-empty one without `force`; with it, anything not matching `produces`)."""
    dest = Path(dest).expanduser().absolute()
    _refuse_overlap(dest, protect, "directory")
    if dest.exists() and not dest.is_dir():
        raise UserError(f"refusing to write to {dest}: it exists and is not a directory")
    if not dest.is_dir():
        _require_creatable(dest)
        return
    entries = sorted(entry.name for entry in dest.iterdir())
    if entries and not force:
        raise UserError(f"refusing to overwrite {dest}: the directory is not empty", help="pass --force to replace it")
    foreign = [name for name in entries if not any(fnmatch.fnmatchcase(name, pattern) for pattern in produces)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(
            f"refusing to replace {dest}: it holds {len(foreign)} file(s) that this command does not write ({shown})",
            help="--force replaces only a previous output of the same command; move those files away or choose "
            "another output directory",
        )


def check_output_file(path: str | os.PathLike, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse, before any work, a secondary output file (a report) that is an input, lies inside one, is a
    directory, or whose directory does not exist."""
    path = Path(path).expanduser().absolute()
    _refuse_overlap(path, protect, "file")
    if path.is_dir():
        raise UserError(f"refusing to write to {path}: it is a directory", help="name a file to write")
    if path.exists() and not path.is_file():
        raise UserError(f"refusing to write to {path}: it is not a regular file", help="name a file to write")
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: the directory {path.parent} does not exist", help="create it first")
    return path


def _require_creatable(dest: Path) -> None:
    """UserError when `dest` cannot be made: the nearest existing ancestor is not a writable directory."""
    ancestor = dest.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot create {dest}: {ancestor} is not a directory", help="choose another output path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"cannot create {dest}: {ancestor} is not writable", help="choose another output path")


def _refuse_overlap(dest: Path, protect: Iterable[str | os.PathLike], what: str) -> None:
    real_dest = dest.resolve()
    for item in protect:
        guarded = Path(item).expanduser().resolve()
        if real_dest == guarded or guarded in real_dest.parents or real_dest in guarded.parents:
            kind = "directory" if guarded.is_dir() else "file"
            raise UserError(
                f"refusing to write to {dest}: it overlaps the input {kind} {guarded}",
                help=f"choose an output {what} outside the inputs (the model, the adapters, the spec)",
            )


def remove_stale_temporaries(dest: str | os.PathLike) -> list[Path]:
    """Remove the `.DEST.tmp-PID-*` / `.DEST.old-PID-*` entries beside `dest` whose process no longer runs."""
    dest = Path(dest).expanduser().absolute()
    if not dest.parent.is_dir():
        return []
    removed = []
    for candidate in sorted(dest.parent.glob(f".{glob.escape(dest.name)}.[to][ml][pd]-*")):
        pid = _pid_in(candidate.name, dest.name)
        if pid is None or process_alive(pid):
            continue
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def _pid_in(name: str, dest_name: str) -> int | None:
    for kind in ("tmp", "old"):
        prefix = f".{dest_name}.{kind}-"
        if name.startswith(prefix):
            pid = name[len(prefix) :].split("-", 1)[0]
            return int(pid) if pid.isdigit() else None
    return None


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


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


def _move_into_place(tmp: Path, dest: Path) -> None:
    if not dest.exists():
        os.rename(tmp, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-{os.getpid()}-", dir=dest.parent))
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
    remove_stale_temporaries(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent)
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
    remove_stale_temporaries(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent)
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
