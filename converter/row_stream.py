"""Row instances streamed: the one source tensor read, hashed, cast, judged and written to its TP ranks' files a
block of whole rows at a time, so that a worker holds a few blocks instead of the whole tensor and its copies at
each step of the whole-tensor path (read, digest, cast, guard, slice copy, digest, write).

A row instance streams when the plan says that each rank's tensor is one slice of one source and no op but the cast
applies (`stream_slices`). The others, and any tensor with a value that is not finite once cast, take the
whole-tensor path (converter/execute.py), so the value guard's errors, --clamp and --allow-nonfinite are as before.
The bytes written and every digest are those of the whole-tensor path (tests/test_row_stream.py).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .cast import BLOCK_ELEMENTS, cast_block, through_float32
from .digests import new_hash
from .plan import PlannedTensor
from .planned_file import PlannedFile
from .safetensors_header import Shape
from .source import Source
from .transforms import Slice, Sliced

# Elements per block (whole rows, at least one): 8 MiB of bfloat16. Each block costs a few torch and numpy calls
# under the GIL per rank slice; in blocks of 2**18 elements (one in a core's L2 cache), 16 workers at tp 8 spent
# 12.5 x the thread-seconds of one worker waiting on it, so that 16 cores converted about as fast as one
# (bench/convert_phases.py, docs/performance.md). On 2 cores blocks of 2**18 to 2**22 elements convert as fast.
BLOCK = 1 << 22


def stream_slices(tensors: Sequence[PlannedTensor], tp: int) -> tuple[Slice, ...] | None:
    """Each rank tensor's slice of the row instance's one source (`Sliced.rank_slice`) when it can be streamed: no
    op but the cast, a shard whose `forward` is `Sliced.forward`, a source of at least one dimension and one element,
    zeros (if any) after the last row only; else None."""
    head = tensors[0]
    if head.ops or not isinstance(head.shard, Sliced) or type(head.shard).forward is not Sliced.forward:
        return None
    shape = head.source_shapes[0]
    if not shape or not math.prod(shape):
        return None
    slices = tuple(head.shard.rank_slice(shape, tp, t.tp_rank) for t in tensors)
    if any(dim and stop - start != t.shape[dim] for (dim, start, stop), t in zip(slices, tensors)):
        return None
    return slices


def held_bytes(tensor: PlannedTensor, stored: torch.dtype) -> int:
    """The bytes a streamed row instance of `tensor` (its source stored as `stored`) holds at most: its block
    buffers (the read, the cast, a slice's contiguous copy) and the cast's float32 staging block."""
    shape = tensor.source_shapes[0]
    block = _block_rows(shape) * math.prod(shape[1:])
    return block * (stored.itemsize + 2 * tensor.torch_dtype.itemsize) + 4 * BLOCK_ELEMENTS


def _block_rows(shape: Shape) -> int:
    return max(1, BLOCK // math.prod(shape[1:]))


class _Part:
    """One slice of the source and the rank tensors (replicas: several) that store it: hashed once, written to
    each at the next position."""

    def __init__(self, where: Slice, source: Shape, shape: Shape):
        self.where, self.row_shape = where, source[1:]
        self.row = math.prod(self.row_shape)  # elements per source row
        self.size = math.prod(shape)  # the rank tensor's elements (the slice and any zero rows after it)
        self.targets: list[tuple[PlannedFile, str]] = []
        self.digest = new_hash()
        self.position = 0

    def write(self, values: torch.Tensor, first: int, rows: int, copy: torch.Tensor | None) -> None:
        """Its share of `values`, source rows [first, first + rows) as stored (1-D); `copy`: a buffer as large."""
        dim, start, stop = self.where
        if dim == 0:
            low, high = max(first, start), min(first + rows, stop)
            if low < high:
                self._put(values[(low - first) * self.row : (high - first) * self.row])
            return
        part = values.view(rows, *self.row_shape).narrow(dim, start, stop - start)
        staged = copy[: part.numel()]
        staged.view(part.shape).copy_(part)
        self._put(staged)

    def _put(self, data: torch.Tensor) -> None:
        view = memoryview(data.view(torch.uint8).numpy())
        self.digest.update(view)
        for file, name in self.targets:
            file.write_at(name, view, self.position)
        self.position += len(view)

    def finish(self, itemsize: int) -> None:
        """Zeros up to the rank tensor's size (a padded vocabulary's last rows), then each target recorded written."""
        missing = self.size * itemsize - self.position
        if missing:
            self._put(torch.zeros(missing, dtype=torch.uint8))
        for file, name in self.targets:
            file.written(name, self.digest.digest())


def write_streamed(tensors: Sequence[PlannedTensor], files: Sequence[PlannedFile], slices: Sequence[Slice],
                   source: Source) -> bool:
    """Write a row instance's rank tensors (`tensors`, one per TP rank, into `files`; `slices` from
    `stream_slices`) a block of source rows at a time. False, with no tensor recorded as written (the bytes already
    written are overwritten by the whole-tensor path), when a stored value is NaN or infinite."""
    head = tensors[0]
    name, shape, dtype = head.sources[0], head.source_shapes[0], head.torch_dtype
    stored = source.dtype(name)
    row = math.prod(shape[1:])
    elements = _block_rows(shape) * row
    out = torch.empty(elements, dtype=dtype) if dtype != stored else None
    scratch = torch.empty(BLOCK_ELEMENTS, dtype=torch.float32) if through_float32(stored, dtype) else None
    parts: dict[Slice, _Part] = {}
    for where, tensor, file in zip(slices, tensors, files):
        parts.setdefault(where, _Part(where, shape, tensor.shape)).targets.append((file, tensor.name))
    copy = torch.empty(elements, dtype=dtype) if any(dim for dim, _, _ in parts) else None
    extremes: list[torch.Tensor] = []
    first = 0
    for raw in source.blocks(name, elements * stored.itemsize):
        values = raw.view(stored)
        if out is not None:
            cast_block(values, out[: values.numel()], scratch)
            values = out[: values.numel()]
        extremes.extend(torch.aminmax(values))
        rows = values.numel() // row
        for part in parts.values():
            part.write(values, first, rows, copy)
        first += rows
    if not bool(torch.isfinite(torch.stack(extremes)).all()):
        return False
    for part in parts.values():
        part.finish(dtype.itemsize)
    return True
