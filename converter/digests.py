"""File digests for the integrity manifest, taken from bytes already in hand wherever the conversion has them.

Two schemes, named in each digest:
- `sha256`: the SHA-256 of the whole file (JSON files, and every file of a format-1 manifest);
- `safetensors-sha256`: the SHA-256 of the concatenated SHA-256s of the header (length prefix and JSON, padding
  included) and of every tensor's data in file order. The validated header tiles the data section exactly, so
  this covers every byte of the file, like `sha256`; unlike it, its parts are hashed as the converter reads
  and writes each tensor, on the worker threads, instead of in a second pass over a multi-GB file on one core.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from .bounded_read import regular_file_size
from .errors import ShardproofError
from .safetensors_header import read_safetensors_header

WHOLE, SAFETENSORS = "sha256", "safetensors-sha256"
SCHEMES = (WHOLE, SAFETENSORS)
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class FileDigest:
    """A file's digest (hex) under `scheme`, and its size in bytes."""

    sha256: str
    size: int
    scheme: str = WHOLE


def part_digest(data: bytes | memoryview) -> bytes:
    """The SHA-256 of one part (header or tensor) of a safetensors file."""
    return hashlib.sha256(data).digest()


def combined(header: bytes, tensors: Iterable[bytes], size: int) -> FileDigest:
    """The `safetensors-sha256` digest from the part digests: the header's, then the tensors' in file order."""
    h = hashlib.sha256(header)
    for digest in tensors:
        h.update(digest)
    return FileDigest(h.hexdigest(), size, SAFETENSORS)


def scheme_for(path: Path) -> str:
    """The scheme a conversion writes for `path`: per tensor for safetensors files, whole for the rest."""
    return SAFETENSORS if Path(path).suffix == ".safetensors" else WHOLE


def file_digest(path: Path, scheme: str | None = None, known: Mapping[str, bytes] | None = None,
                workers: int = 1) -> FileDigest:
    """The digest of the regular file `path` under `scheme` (default `scheme_for(path)`). For `safetensors-sha256`,
    `known` holds tensor digests already taken (tensor name -> digest); the others are read, `workers` at a time."""
    scheme = scheme or scheme_for(path)
    size = regular_file_size(path)
    try:
        if scheme == WHOLE:
            return FileDigest(_range_digest(path, 0, size).hexdigest(), size, WHOLE)
        header = read_safetensors_header(path)
        entries = sorted(header.tensors.items(), key=lambda item: item[1].begin)
        known = known or {}

        def tensor(item) -> bytes:
            name, entry = item
            if name in known:
                return known[name]
            return _range_digest(path, header.data_start + entry.begin, entry.end - entry.begin).digest()

        with concurrent.futures.ThreadPoolExecutor(max(workers, 1)) as pool:
            parts = list(pool.map(tensor, entries))
        return combined(_range_digest(path, 0, header.data_start).digest(), parts, size)
    except OSError as e:
        raise ShardproofError(f"{path}: cannot read ({e.strerror})") from None


def _range_digest(path: Path, start: int, length: int) -> "hashlib._Hash":
    """SHA-256 of `length` bytes of `path` from `start`, read in chunks; ShardproofError if the file is shorter."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while length:
            chunk = f.read(min(_CHUNK, length))
            if not chunk:
                raise ShardproofError(f"{path}: file is truncated")
            h.update(chunk)
            length -= len(chunk)
    return h
