"""safetensors headers read without touching data, and a writer that streams tensors into a planned file."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Sequence

import torch

from .dtypes import from_safetensors_code, safetensors_code
from .errors import ShardproofError

Shape = tuple[int, ...]
_MAX_HEADER = 100 * 1024 * 1024


def _parse_header(path: Path) -> tuple[dict, int]:
    """The raw header dict of a safetensors file and the offset where its data starts."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ShardproofError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_HEADER:
                raise ShardproofError(f"{path}: not a safetensors file (header length {length} is implausible)")
            header = json.loads(f.read(length))
    except FileNotFoundError:
        raise ShardproofError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ShardproofError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ShardproofError(f"{path}: not a safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    return header, 8 + length


def read_header(path: Path) -> dict[str, tuple[str, Shape]]:
    """{tensor name: (dtype code, shape)} of a safetensors file, from its header alone."""
    header, _ = _parse_header(path)
    try:
        return {name: (entry["dtype"], tuple(entry["shape"])) for name, entry in header.items()}
    except (TypeError, KeyError):
        raise ShardproofError(f"{path}: not a safetensors file (malformed header entry)") from None


class TensorReader:
    """Reads single tensors of a safetensors file with plain reads (no mmap), so memory holds only what was asked."""

    def __init__(self, path: Path):
        self.path = path
        self._header, self._data_start = _parse_header(path)

    def read(self, name: str) -> torch.Tensor:
        entry = self._header[name]
        dtype = from_safetensors_code(entry["dtype"])
        begin, end = entry["data_offsets"]
        if end - begin != math.prod(entry["shape"]) * dtype.itemsize:
            raise ShardproofError(f"{self.path}: tensor {name} has {end - begin} bytes, its shape needs more or fewer")
        buffer = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            if f.readinto(buffer) != len(buffer):
                raise ShardproofError(f"{self.path}: file is truncated (tensor {name} is incomplete)")
        if not buffer:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])


class StreamWriter:
    """Writes a safetensors file whose header is known in advance, one tensor at a time, in the planned order."""

    def __init__(self, path: Path, entries: Sequence[tuple[str, torch.dtype, Shape]]):
        self._entries = list(entries)
        self._next = 0
        header, offset = {}, 0
        for name, dtype, shape in self._entries:
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": safetensors_code(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, dtype, shape = self._entries[self._next]
        if name != expected_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise AssertionError(
                f"planned {expected_name} {dtype} {list(shape)}, got {name} {tensor.dtype} {list(tensor.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._entries):
            raise AssertionError(f"{len(self._entries) - self._next} planned tensors were never written")

    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._file.close()

