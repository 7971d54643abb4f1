"""The safetensors header, validated as the safetensors library validates it, before any tensor is planned.

The rules follow the `safetensors` Rust crate (`SafeTensors::read_metadata` and `Metadata::validate` in
safetensors/src/tensor.rs), which `safetensors.torch.load_file` applies: a little-endian u64 header length
of at most 100,000,000 that fits in the file; a UTF-8 JSON object whose `__metadata__` (optional, may be
null) maps strings to strings and whose other entries each hold a known `dtype`, a `shape` of unsigned ints
and exactly two unsigned-int `data_offsets`; entries sorted by offsets must run contiguously from 0, each
spanning exactly prod(shape) x element size bytes (whole bytes for sub-byte dtypes, no u64 overflow), and
the last must end exactly at the end of the file: trailing bytes are refused, as the crate refuses them
(MetadataIncompleteBuffer). A file is judged here from its header and size alone; nothing is allocated
beyond the header, whose length is bounded by the file's real size.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from .bounded_read import regular_file_size
from .errors import ShardproofError

Shape = tuple[int, ...]
MAX_HEADER = 100_000_000  # the crate's MAX_HEADER_SIZE
_U64 = 2**64

# Bits per element of every dtype the crate knows (safetensors 0.8: Dtype::bitsize).
DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of the header: dtype code, shape and byte range within the data section."""

    dtype: str
    shape: Shape
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: its tensors and the file offset where the data section starts."""

    tensors: dict[str, HeaderEntry]
    data_start: int


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """The validated header of the safetensors file `path`, or ShardproofError naming the file and the fault."""
    size = regular_file_size(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ShardproofError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (length,) = struct.unpack("<Q", raw)
            if length > MAX_HEADER:
                raise ShardproofError(f"{path}: not a safetensors file (header length {length} is implausible)")
            if 8 + length > size:
                raise ShardproofError(f"{path}: not a safetensors file (header length {length} exceeds the file's {size} bytes)")
            text = f.read(length)
    except OSError as e:
        raise ShardproofError(f"{path}: cannot read ({e.strerror})") from None
    if len(text) != length:
        raise ShardproofError(f"{path}: file is truncated (shorter than its header)")
    tensors = parse_header(text, size - 8 - length, str(path))
    return SafetensorsHeader(tensors, 8 + length)


def parse_header(text: bytes, data_size: int, where: str) -> dict[str, HeaderEntry]:
    """The entries of header bytes `text` for a data section of `data_size` bytes; `where` names the file."""

    def bad(problem: str) -> ShardproofError:
        return ShardproofError(f"{where}: not a valid safetensors file ({problem})")

    try:
        header = json.loads(text.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise bad("header is not UTF-8") from None
    except (ValueError, RecursionError):  # JSONDecodeError, NaN/Infinity, over-long integers, deep nesting
        raise bad("header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise bad("__metadata__ is not a map of strings")
    entries = {name: _entry(name, value, bad) for name, value in header.items()}
    end = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != end or entry.end < entry.begin:
            raise bad(f"tensor {name!r} has data_offsets [{entry.begin}, {entry.end}], expected to start at {end}")
        end = entry.end
        needed = _byte_size(entry, name, bad)
        if entry.end - entry.begin != needed:
            raise bad(f"tensor {name!r} spans {entry.end - entry.begin} bytes, its dtype and shape need {needed}")
    if end != data_size:
        raise bad(f"tensors cover {end} bytes of data, the file holds {data_size}")
    return entries


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _entry(name: str, value: object, bad) -> HeaderEntry:
    if not isinstance(value, dict):
        raise bad(f"entry {name!r} is not an object")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in value]
    if missing:
        raise bad(f"entry {name!r} has no {missing[0]}")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise bad(f"entry {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        raise bad(f"entry {name!r} has a shape that is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
        raise bad(f"entry {name!r} has data_offsets that are not two non-negative integers")
    return HeaderEntry(dtype, tuple(shape), offsets[0], offsets[1])


def _is_u64(value: object) -> bool:
    return type(value) is int and 0 <= value < _U64


def _byte_size(entry: HeaderEntry, name: str, bad) -> int:
    """prod(shape) x element bits / 8, refused on u64 overflow or a partial byte, as the crate does."""
    elements = 1
    for dim in entry.shape:
        elements *= dim
        if elements >= _U64:
            raise bad(f"tensor {name!r} has a shape whose size overflows")
    bits = elements * DTYPE_BITS[entry.dtype]
    if bits >= _U64:
        raise bad(f"tensor {name!r} has a shape whose size overflows")
    if bits % 8:
        raise bad(f"tensor {name!r} does not end on a byte boundary")
    return bits // 8
