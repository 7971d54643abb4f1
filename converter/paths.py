"""Path relations judged on resolved paths (symlinks followed), so no spelling of a path escapes a check."""

from __future__ import annotations

import os
from pathlib import Path


def resolved(path: Path | str) -> Path:
    """`path` made absolute with every existing symlink resolved (the rest kept as spelled)."""
    return Path(os.path.realpath(path))


def within(path: Path | str, root: Path | str) -> bool:
    """Whether `path` is `root` or lies below it, after resolving both."""
    path, root = resolved(path), resolved(root)
    return path == root or root in path.parents


def overlap(a: Path | str, b: Path | str) -> bool:
    """Whether `a` and `b` are the same directory or one contains the other, after resolving both."""
    return within(a, b) or within(b, a)
