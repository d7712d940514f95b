"""Inputs read safely: regular files only (a FIFO, socket or device is refused at once instead of blocking)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import UserError


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """`path` opened for reading in binary; UserError when it is missing, a directory or not a regular file."""
    try:
        # O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer; the check below refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror or error})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a pipe, socket or device)"
        raise UserError(f"{path}: is {what}", help="give the path of a file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def check_regular_file(path: Path) -> None:
    """Refuse a missing path, a directory, a FIFO or a device before opening it (a FIFO would block)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as e:
        raise UserError(f"{path}: no such file") from e
    except OSError as e:
        raise UserError(f"{path}: cannot read the file: {e.strerror or e}") from e
    if stat.S_ISDIR(mode):
        raise UserError(f"{path}: is a directory, not a file", help="remove or rename the directory")
    if not stat.S_ISREG(mode):
        raise UserError(f"{path}: not a regular file (a FIFO, socket or device)", help="replace it with the real file")
