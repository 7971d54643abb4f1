"""Host memory during a verification: large allocations go back to the system as soon as they are freed, and the
garbage collector's scans skip the libraries' objects."""

from __future__ import annotations

import contextlib
import ctypes
import gc
from typing import Iterator

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20


def return_large_frees() -> None:
    """Under glibc, serve every allocation of 1 MiB or more with its own mapping, so that freeing it unmaps it at
    once. By default glibc raises that threshold (up to 32 MiB) as blocks are freed and keeps freed blocks in
    per-thread arenas: a streamed verification frees tensors of every size from several threads (transformers'
    loader), and the peak RSS of verifying a 1.2 GiB model varied from 1.85 to 2.9 GiB between identical runs
    (1.76 GiB both times with this, at the same speed; docs/performance.md). Elsewhere (no mallopt): nothing."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


@contextlib.contextmanager
def libraries_frozen() -> Iterator[None]:
    """Within the block, the objects that exist when it starts (torch's, transformers') are out of the collector's
    reach: every model dropped calls gc.collect(), which otherwise scans them all each time (0.12 s a call on the
    2-core machine). Nested blocks leave the outermost one to unfreeze."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
