"""Reads of user files bounded by the file's real size and a limit, with one-line errors naming the file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import ShardproofError


def regular_file_size(path: Path) -> int:
    """The size of `path`, which must be a regular file (not a directory, device or FIFO)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ShardproofError(f"{path}: file not found") from None
    except OSError as e:
        raise ShardproofError(f"{path}: cannot read ({e.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ShardproofError(f"{path}: is a directory, expected a file")
    if not stat.S_ISREG(info.st_mode):
        raise ShardproofError(f"{path}: not a regular file")
    return info.st_size


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of the regular file `path`, refused when it holds more than `limit` bytes."""
    size = regular_file_size(path)
    if size > limit:
        raise ShardproofError(f"{path}: {size} bytes, more than the {limit} this file may have")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)  # the file may have grown since stat
    except OSError as e:
        raise ShardproofError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) > limit:
        raise ShardproofError(f"{path}: more than the {limit} bytes this file may have")
    return data
