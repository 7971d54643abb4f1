"""File digests for the integrity manifest, taken from bytes already in hand wherever the conversion has them.

Each digest names its scheme:
- `blake3`: the BLAKE3 of the whole file (JSON files);
- `safetensors-blake3`: the BLAKE3 of the concatenated BLAKE3s of the header (length prefix and JSON, padding
  included) and of every tensor's data in file order. The validated header tiles the data section exactly, so
  this covers every byte of the file, like `blake3`; unlike it, its parts are hashed as the converter reads
  and writes each tensor, on the worker threads, instead of in a second pass over a multi-GB file on one core.
A conversion writes these two. `sha256` and `safetensors-sha256`, the same with SHA-256, are what manifests of
formats 1 and 2 hold: still read and checked. BLAKE3 hashes 4.5 x as fast as SHA-256 on one core (5.4 against
1.2 GB/s on the 2-core machine), which was a third of a conversion's work there (docs/performance.md).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import blake3

from .bounded_read import regular_file_size
from .errors import ShardproofError
from .safetensors_header import read_safetensors_header

WHOLE, SAFETENSORS = "blake3", "safetensors-blake3"
_ALGORITHMS: dict[str, Callable[..., Any]] = {"blake3": blake3.blake3, "sha256": hashlib.sha256}
SCHEMES = tuple(f"{kind}{name}" for name in _ALGORITHMS for kind in ("", "safetensors-"))
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class FileDigest:
    """A file's digest (hex) under `scheme`, and its size in bytes."""

    digest: str
    size: int
    scheme: str = WHOLE


def new_hash(scheme: str = SAFETENSORS) -> Any:
    """A hash object of `scheme`'s algorithm (`update`, `digest`, `hexdigest`), for a whole file or for one part."""
    return _ALGORITHMS[scheme.removeprefix("safetensors-")]()


def part_digest(data: bytes | memoryview, scheme: str = SAFETENSORS) -> bytes:
    """The digest of one part (header or tensor) of a safetensors file."""
    h = new_hash(scheme)
    h.update(data)
    return h.digest()


def combined(header: bytes, tensors: Iterable[bytes], size: int, scheme: str = SAFETENSORS) -> FileDigest:
    """The `scheme` digest (a safetensors one) from the part digests: the header's, then the tensors' in file
    order."""
    h = new_hash(scheme)
    h.update(header)
    for digest in tensors:
        h.update(digest)
    return FileDigest(h.hexdigest(), size, scheme)


def scheme_for(path: Path) -> str:
    """The scheme a conversion writes for `path`: per tensor for safetensors files, whole for the rest."""
    return SAFETENSORS if Path(path).suffix == ".safetensors" else WHOLE


def file_digest(path: Path, scheme: str | None = None, known: Mapping[str, bytes] | None = None,
                workers: int = 1) -> FileDigest:
    """The digest of the regular file `path` under `scheme` (default `scheme_for(path)`). For a safetensors scheme,
    `known` holds tensor digests already taken with its algorithm (tensor name -> digest); the others are read,
    `workers` at a time."""
    scheme = scheme or scheme_for(path)
    size = regular_file_size(path)
    try:
        if not scheme.startswith("safetensors-"):
            return FileDigest(_range_digest(path, 0, size, scheme).hexdigest(), size, scheme)
        header = read_safetensors_header(path)
        entries = sorted(header.tensors.items(), key=lambda item: item[1].begin)
        known = known or {}

        def tensor(item) -> bytes:
            name, entry = item
            if name in known:
                return known[name]
            return _range_digest(path, header.data_start + entry.begin, entry.end - entry.begin, scheme).digest()

        with concurrent.futures.ThreadPoolExecutor(max(workers, 1)) as pool:
            parts = list(pool.map(tensor, entries))
        return combined(_range_digest(path, 0, header.data_start, scheme).digest(), parts, size, scheme)
    except OSError as e:
        raise ShardproofError(f"{path}: cannot read ({e.strerror})") from None


def _range_digest(path: Path, start: int, length: int, scheme: str) -> Any:
    """The hash under `scheme`'s algorithm of `length` bytes of `path` from `start`, read in chunks;
    ShardproofError if the file is shorter."""
    h = new_hash(scheme)
    with open(path, "rb") as f:
        f.seek(start)
        while length:
            chunk = f.read(min(_CHUNK, length))
            if not chunk:
                raise ShardproofError(f"{path}: file is truncated")
            h.update(chunk)
            length -= len(chunk)
    return h
