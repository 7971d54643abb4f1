"""Output directories that appear only when complete, never over an input, never left half-written."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Iterator, Sequence

from .errors import ShardproofError
from .paths import overlap
from .staging import make_staging, stale_stagings

log = logging.getLogger("shardproof")


def check_output(final: Path, overwrite: bool = False, inputs: Sequence[Path] = ()) -> None:
    """Refuse an output that is, contains or lies inside an input, is a symlink, or exists without `overwrite`."""
    final = Path(final)
    for source in inputs:
        if overlap(final, source):
            raise ShardproofError(f"{final}: the output directory would overlap the input {source}; choose a separate directory")
    try:
        if final.is_symlink():
            raise ShardproofError(f"{final}: is a symbolic link; give the directory it points to, or another path")
        if final.exists() and not final.is_dir():
            raise ShardproofError(f"{final}: exists and is not a directory")
        if final.exists() and not overwrite and any(final.iterdir()):
            raise ShardproofError(f"{final}: already exists and is not empty (pass --overwrite to replace it)")
        ancestor = next((p for p in final.parents if os.path.lexists(p)), None)
        if ancestor is not None and not ancestor.is_dir():
            raise ShardproofError(f"{ancestor}: is not a directory, so it cannot hold the output {final}")
    except OSError as e:
        raise _filesystem_error(final, e) from None


@contextlib.contextmanager
def atomic_directory(final: Path, overwrite: bool = False, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a staging directory beside `final`, moved into place only if the block completes.

    The staging directory is removed on any exception, Ctrl-C or SIGTERM (after which SIGTERM is delivered
    again to its previous handler); staging directories of earlier runs killed outright are removed first.
    Filesystem errors inside the block (no space, file too large, permissions) become one-line errors.
    """
    final = Path(final)
    check_output(final, overwrite, inputs)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in stale_stagings(final):
            log.warning(f"removing {stale}: left by an earlier run into {final} that did not finish")
            shutil.rmtree(stale)
        staging = make_staging(final)
    except OSError as e:
        raise _filesystem_error(final, e) from None
    terminated = False
    try:
        with _sigterm_raises():
            yield staging
        with _signals_deferred():  # between removing an old output and renaming, nothing may interrupt
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
    except _Terminated:
        terminated = True
    except OSError as e:
        raise _filesystem_error(final, e) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if terminated:
        os.kill(os.getpid(), signal.SIGTERM)  # the previous handler (by default: exit) now sees it
        raise ShardproofError(f"{final}: terminated by SIGTERM before it was complete; nothing was written")


def _filesystem_error(final: Path, e: OSError) -> ShardproofError:
    reason = e.strerror or type(e).__name__
    if e.filename is None or Path(e.filename) == final:
        return ShardproofError(f"{final}: cannot write the output directory ({reason})")
    return ShardproofError(f"{e.filename}: cannot write the output {final} ({reason})")


class _Terminated(BaseException):
    """SIGTERM arrived while a staging directory existed."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises _Terminated (as SIGINT raises KeyboardInterrupt) so cleanup runs."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        yield
        return

    def raise_terminated(signum, frame):
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM wait; they are delivered when it ends."""
    deferred = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, deferred)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
