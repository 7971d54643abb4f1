"""safetensors headers read without touching data, and a writer that streams tensors into a planned file."""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .digests import new_hash, part_digest
from .dtypes import from_safetensors_code, safetensors_code
from .errors import ShardproofError
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
    """Reads single tensors of a safetensors file with plain reads (no mmap), so memory holds only what was asked.
    Set `digests` to a dict to record in it the SHA-256 of each tensor's bytes as read (converter/digests.py); None
    (the default) takes none: only a conversion needs them, for its manifest."""

    def __init__(self, path: Path):
        self.path = path
        header = read_safetensors_header(path)
        self.entries, self._data_start = header.tensors, header.data_start
        self.digests: dict[str, bytes] | None = None

    def _dtype(self, name: str) -> torch.dtype:
        try:
            return from_safetensors_code(self.entries[name].dtype)
        except ShardproofError as e:
            raise ShardproofError(f"{self.path}: tensor {name}: {e}") from None

    def read_to(self, name: str, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`read(name)` on `device`, cast to `dtype` (None: as stored). A cast, and any read to a GPU, goes one
        staging buffer at a time, so memory holds the result and a buffer, never the stored copy beside it; to a GPU
        the buffers are pinned and the copies asynchronous (a host copy of the tensor would be freshly faulted pages,
        zeroed before the read fills them). Digests, when recorded, are taken on the plain path."""
        entry, stored = self.entries[name], self._dtype(name)
        dtype = dtype or stored
        if self.digests is not None or (device.type == "cpu" and dtype == stored):
            return self.read(name).to(device).to(dtype)
        size, shape = entry.end - entry.begin, entry.shape
        out = torch.empty(math.prod(shape), dtype=dtype, device=device)
        stages, cuda = _staging(device), device.type == "cuda"
        try:
            with open(self.path, "rb") as f:
                f.seek(self._data_start + entry.begin)
                for i, start in enumerate(range(0, size, STAGE_BYTES)):
                    stage = stages[i % len(stages)]
                    if cuda:
                        stage.copied.synchronize()  # its previous copy to the device is done
                    part = stage.host[: min(STAGE_BYTES, size - start)]
                    if f.readinto(memoryview(part.numpy())) != part.numel():
                        raise ShardproofError(f"{self.path}: file is truncated (tensor {name} is incomplete)")
                    first = start // stored.itemsize
                    target = out[first : first + part.numel() // stored.itemsize]
                    if cuda and dtype != stored:  # to the device as stored, then cast there
                        if stage.device is None:  # made for the first cast: a read as stored needs none
                            stage.device = torch.empty(STAGE_BYTES, dtype=torch.uint8, device=device)
                        staged = stage.device[: part.numel()]
                        staged.copy_(part, non_blocking=True)
                        target.copy_(staged.view(stored))
                    else:
                        target.copy_(part.view(stored), non_blocking=cuda)
                    if cuda:
                        stage.copied.record(torch.cuda.current_stream(device))
        except OSError as e:
            raise ShardproofError(f"{self.path}: cannot read ({e.strerror})") from None
        finally:
            if cuda:
                for stage in stages:
                    stage.copied.synchronize()
        return out.reshape(shape)

    def read(self, name: str) -> torch.Tensor:
        entry, dtype = self.entries[name], self._dtype(name)
        # torch.empty, not bytearray(n): bytearray zero-fills every page before the read writes it again (the
        # largest cost of a streamed verification at 8B, measured), and torch's allocation is 64-byte aligned.
        tensor = torch.empty(entry.end - entry.begin, dtype=torch.uint8)  # bounded: the header was checked
        buffer = memoryview(tensor.numpy())
        try:
            with open(self.path, "rb") as f:  # buffered: its readinto loops past read(2)'s 2 GiB limit
                f.seek(self._data_start + entry.begin)
                complete = f.readinto(buffer) == len(buffer)
        except OSError as e:
            raise ShardproofError(f"{self.path}: cannot read ({e.strerror})") from None
        if not complete:
            raise ShardproofError(f"{self.path}: file is truncated (tensor {name} is incomplete)")
        if self.digests is not None:
            self.digests[name] = part_digest(buffer)
        if not len(buffer):
            return torch.empty(entry.shape, dtype=dtype)
        return tensor.view(dtype).reshape(entry.shape)

    def blocks(self, name: str, block_bytes: int) -> Iterator[torch.Tensor]:
        """Tensor `name`'s bytes as stored, `block_bytes` at a time (the last block shorter), each a uint8 view of
        one buffer that the next block overwrites (positional reads, no mmap); its digest, when recorded, is taken
        block by block and recorded once the last block is read."""
        entry = self.entries[name]
        size = entry.end - entry.begin
        buffer = torch.empty(min(block_bytes, size), dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        digest = new_hash() if self.digests is not None else None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise ShardproofError(f"{self.path}: cannot read ({e.strerror})") from None
        try:
            for start in range(0, size, block_bytes):
                length, offset = min(block_bytes, size - start), self._data_start + entry.begin + start
                done = 0
                while done < length:
                    count = os.preadv(fd, [view[done:length]], offset + done)
                    if not count:
                        raise ShardproofError(f"{self.path}: file is truncated (tensor {name} is incomplete)")
                    done += count
                if digest is not None:
                    digest.update(view[:length])
                yield buffer[:length]
        except OSError as e:
            raise ShardproofError(f"{self.path}: cannot read ({e.strerror})") from None
        finally:
            os.close(fd)
        if digest is not None:
            self.digests[name] = digest.digest()


STAGE_BYTES = 1 << 26  # two 64 MiB staging buffers per reading thread: the read of one overlaps the copy of the other
_stages = threading.local()


@dataclass
class _Stage:
    """One staging buffer: on the host (pinned for a GPU), its device twin for a cast there (made by the first
    cast: the lock step reads as stored, so its passes' threads hold no device buffer), and the event of its last
    copy to the device."""

    host: torch.Tensor
    device: torch.Tensor | None = None
    copied: "torch.cuda.Event | None" = None


def _staging(device: torch.device) -> list[_Stage]:
    """This thread's staging buffers for reads to `device`."""
    key = str(device)
    cache = _stages.__dict__.setdefault("by_device", {})
    if key not in cache:
        if device.type == "cuda":
            with torch.cuda.device(device):
                cache[key] = [_Stage(torch.empty(STAGE_BYTES, dtype=torch.uint8, pin_memory=True), None,
                                     torch.cuda.Event()) for _ in range(2)]
        else:
            cache[key] = [_Stage(torch.empty(STAGE_BYTES, dtype=torch.uint8))]
    return cache[key]


def planned_header(entries: Sequence[tuple[str, torch.dtype, Shape]]) -> tuple[bytes, list[int]]:
    """The bytes before a safetensors file's data (length prefix and JSON header) for tensors stored in the order
    of `entries`, and each tensor's offset in the file."""
    header, offsets, offset = {}, [], 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": safetensors_code(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
        offsets.append(offset)
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    prefix = struct.pack("<Q", len(encoded)) + encoded
    return prefix, [len(prefix) + o for o in offsets]

