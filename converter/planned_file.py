"""A safetensors file written from its planned header: tensors go to their planned offsets, in any order, from
any thread (positional writes), so the bytes are those of writing them in order; with `hashed`, each is hashed as
it is written, so the file's digest needs no second pass."""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Sequence

import torch

from .digests import FileDigest, combined, part_digest
from .safetensors_header import Shape
from .safetensors_io import planned_header


class PlannedFile:
    """Writes the header at once; `write` puts each planned tensor at its offset; `close` checks all were written;
    with `hashed`, `digest` is then the file's `safetensors-blake3` digest."""

    def __init__(self, path: Path, entries: Sequence[tuple[str, torch.dtype, Shape]], hashed: bool = False):
        self.path = path
        prefix, offsets = planned_header(entries)
        self._slots = {name: (dtype, tuple(shape), offset) for (name, dtype, shape), offset in zip(entries, offsets)}
        self._size = len(prefix) + sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in entries)
        self._header_digest = part_digest(prefix) if hashed else None
        self._digests: dict[str, bytes] = {}
        self._written: set[str] = set()
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._write_at(memoryview(prefix), 0)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Tensor `name` whole, of its planned dtype and shape."""
        dtype, shape, _ = self._slots[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise AssertionError(f"planned {name} {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}")
        data = memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
        self.write_at(name, data, 0)
        self.written(name, part_digest(data) if self._header_digest is not None else b"")

    def write_at(self, name: str, data: memoryview, position: int) -> None:
        """Bytes of tensor `name` from byte `position` of its data (a tensor may be written in parts, in any
        order; `written` then records it whole)."""
        self._write_at(data, self._slots[name][2] + position)

    def written(self, name: str, digest: bytes) -> None:
        """Tensor `name` is complete; `digest` is its bytes' `digests.part_digest` (kept when the file is `hashed`)."""
        with self._lock:
            if name in self._written:
                raise AssertionError(f"{name} was written twice")
            self._written.add(name)
        self._digests[name] = digest

    @property
    def digest(self) -> FileDigest:
        """The digest of the file as planned and written (every tensor written: `close` checked it)."""
        if self._header_digest is None:
            raise AssertionError(f"{self.path} was not opened with hashed=True")
        return combined(self._header_digest, (self._digests[name] for name in self._slots), self._size)

    def _write_at(self, data: memoryview, offset: int) -> None:
        while data:  # one pwrite may write less (Linux: at most 2 GiB - 4 KiB per call)
            written = os.pwrite(self._fd, data, offset)
            data, offset = data[written:], offset + written

    def close(self) -> None:
        os.close(self._fd)
        missing = len(self._slots) - len(self._written)
        if missing:
            raise AssertionError(f"{missing} planned tensors were never written")

    def __enter__(self) -> "PlannedFile":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            os.close(self._fd)
