"""Hidden staging directories beside an output: short names, the umask honoured, stale ones of dead runs found.

A staging directory is `.<up to 64 bytes of the output name>.<hash of the full name>.partial-<pid>-<random>`:
short enough for any valid output name (a name may have 255 bytes), specific to one output, and owned by a
process that can be asked whether it still runs.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

_NAME_BYTES = 64


def staging_prefix(final: Path) -> str:
    """The name prefix shared by every staging directory of the output `final`."""
    encoded = os.fsencode(final.name)
    short = encoded[:_NAME_BYTES].decode("utf-8", "ignore")
    digest = hashlib.sha256(encoded).hexdigest()[:12]
    return f".{short}.{digest}.partial-"


def make_staging(final: Path) -> Path:
    """A new, empty staging directory beside `final`, created with the mode the umask gives (not 0700)."""
    while True:
        staging = final.parent / f"{staging_prefix(final)}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(staging)
            return staging
        except FileExistsError:
            continue


def stale_stagings(final: Path) -> list[Path]:
    """Staging directories of `final` left by runs whose process no longer exists (killed, crashed)."""
    prefix = staging_prefix(final)
    try:
        candidates = [p for p in final.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return []
    return [p for p in candidates if p.is_dir() and not p.is_symlink() and not _alive(p.name[len(prefix):].split("-")[0])]


def _alive(pid: str) -> bool:
    if not pid.isdigit() or int(pid) >= 2**31:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    return True
