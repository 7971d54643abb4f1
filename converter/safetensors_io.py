"""safetensors headers read without touching data, and a writer that streams tensors into a planned file."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Sequence

import torch

from .dtypes import from_safetensors_code, safetensors_code
from .errors import ShardproofError
from .manifest import FileDigest
from .safetensors_header import Shape, read_safetensors_header


def read_header(path: Path) -> dict[str, tuple[str, Shape]]:
    """{tensor name: (dtype code, shape)} of a safetensors file, from its validated header alone."""
    return {name: (e.dtype, e.shape) for name, e in read_safetensors_header(path).tensors.items()}


def raw_tensors(path: Path) -> dict[str, tuple[str, Shape, bytes]]:
    """{tensor name: (dtype code, shape, the tensor's bytes as stored)} of a safetensors file (header validated)."""
    header = read_safetensors_header(path)
    data = Path(path).read_bytes()[header.data_start :]
    return {name: (e.dtype, e.shape, data[e.begin : e.end]) for name, e in header.tensors.items()}


class TensorReader:
    """Reads single tensors of a safetensors file with plain reads (no mmap), so memory holds only what was asked."""

    def __init__(self, path: Path):
        self.path = path
        header = read_safetensors_header(path)
        self._tensors, self._data_start = header.tensors, header.data_start

    def read(self, name: str) -> torch.Tensor:
        entry = self._tensors[name]
        try:
            dtype = from_safetensors_code(entry.dtype)
        except ShardproofError as e:
            raise ShardproofError(f"{self.path}: tensor {name}: {e}") from None
        buffer = bytearray(entry.end - entry.begin)  # bounded: the header was checked against the file size
        try:
            with open(self.path, "rb") as f:
                f.seek(self._data_start + entry.begin)
                complete = f.readinto(buffer) == len(buffer)
        except OSError as e:
            raise ShardproofError(f"{self.path}: cannot read ({e.strerror})") from None
        if not complete:
            raise ShardproofError(f"{self.path}: file is truncated (tensor {name} is incomplete)")
        if not buffer:
            return torch.empty(entry.shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry.shape)


class StreamWriter:
    """Writes a safetensors file whose header is known in advance, one tensor at a time, in the planned order.

    With `digests`, the file's SHA-256 and size, computed from the bytes as they are written, are recorded
    there under its name when it is complete."""

    def __init__(self, path: Path, entries: Sequence[tuple[str, torch.dtype, Shape]], digests: dict[str, FileDigest] | None = None):
        self._entries = list(entries)
        self._next = 0
        self._path, self._digests = Path(path), digests
        self._sha256, self._size = hashlib.sha256(), 0
        header, offset = {}, 0
        for name, dtype, shape in self._entries:
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": safetensors_code(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._file = open(path, "wb")
        self._emit(struct.pack("<Q", len(encoded)) + encoded)

    def _emit(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._sha256.update(data)
        self._size += len(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, dtype, shape = self._entries[self._next]
        if name != expected_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise AssertionError(
                f"planned {expected_name} {dtype} {list(shape)}, got {name} {tensor.dtype} {list(tensor.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._emit(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._entries):
            raise AssertionError(f"{len(self._entries) - self._next} planned tensors were never written")
        if self._digests is not None:
            self._digests[self._path.name] = FileDigest(self._sha256.hexdigest(), self._size)

    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._file.close()

