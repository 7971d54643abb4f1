"""Output directories that appear only when complete."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import ShardproofError


@contextlib.contextmanager
def atomic_directory(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `final`, moved into place only if the block completes."""
    final = Path(final)
    if final.exists() and not (final.is_dir() and not any(final.iterdir())) and not overwrite:
        raise ShardproofError(f"{final}: already exists and is not empty (pass --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield staging
        if final.exists():
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
