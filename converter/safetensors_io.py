"""safetensors headers read without touching data, and a writer that streams tensors into a planned file."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Sequence

import torch

from .dtypes import safetensors_code
from .errors import ShardproofError

Shape = tuple[int, ...]
_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: Path) -> dict[str, tuple[str, Shape]]:
    """{tensor name: (dtype code, shape)} of a safetensors file, from its header alone."""
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
    header.pop("__metadata__", None)
    try:
        return {name: (entry["dtype"], tuple(entry["shape"])) for name, entry in header.items()}
    except (TypeError, KeyError):
        raise ShardproofError(f"{path}: not a safetensors file (malformed header entry)") from None


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

