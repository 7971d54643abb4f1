"""Runs a plan: worker threads make the rank files' tensors, each source tensor read once per pipeline stage and
each shard written at the offset its file's planned header gives it."""

from __future__ import annotations

import contextlib
import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .bounded_pool import run_bounded
from .digests import FileDigest
from .plan import Plan, PlannedTensor
from .planned_file import PlannedFile
from .row_stream import held_bytes, stream_slices, write_streamed
from .source import Source
from .transforms import Slice, to_stored
from .value_range import ValueGuard

Progress = Callable[[str, int], None]  # called with each rank file tensor's name and bytes once it is written
BUDGET_BASE = 1 << 30  # bytes in flight: this plus twice the costliest row instance's, whatever the worker count


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


@dataclass(frozen=True)
class _Instance:
    """One row instance of one pipeline stage: its tensors on the stage's TP ranks (same sources), their files, each
    tensor's slice of the one source when it streams (`stream_slices`), the bytes the whole-tensor path holds for it
    (`cost`: the sources read and what is stored from them) and the bytes it holds while it runs (`held`: a streamed
    instance its blocks, `held_bytes`; otherwise `cost`)."""

    tensors: tuple[PlannedTensor, ...]
    files: tuple[PlannedFile, ...]
    slices: tuple[Slice, ...] | None
    cost: int
    held: int


def _instance(tensors: tuple[PlannedTensor, ...], files: tuple[PlannedFile, ...], source: Source, tp: int) -> _Instance:
    head = tensors[0]
    slices = stream_slices(tensors, tp)
    cost = sum(source.nbytes(name) for name in head.sources) + sum(math.prod(t.shape) * t.torch_dtype.itemsize for t in tensors)
    return _Instance(tensors, files, slices, cost, held_bytes(head, source.dtype(head.sources[0])) if slices else cost)


def write_checkpoint(plan: Plan, source: Source, directory: Path, config: dict | None, progress: Progress | None = None,
                     workers: int = 1, guard: ValueGuard | None = None) -> dict[str, FileDigest]:
    """Write config.json (unless `config` is None) and every rank file of `plan` into `directory`, on `workers`
    threads; return the rank files' digests (by file name), taken from the bytes as they were written.

    The TP ranks of a stage plan the same tensor names in the same order, so each source tensor is read once and
    its shards go to the stage's rank files together. Instances run largest first (so that no large one is left
    to run alone at the end), as many at once as workers and the byte budget allow: the bytes they hold, at most 1 GiB
    plus twice the costliest instance's on the whole-tensor path (so that the two largest run together with others
    beside them). A streamed instance that falls back to the whole-tensor path (a value not finite) does so one at a
    time, so memory stays within the budget plus one instance's cost. The files are the same bytes for any number of
    workers and any order.
    `guard` judges every stored tensor's values (default: refuse non-finite ones).
    """
    tp = plan.layout.mapping.tp_size
    guard = guard or ValueGuard(str(source.model_dir))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    with contextlib.ExitStack() as stack:
        files = [
            stack.enter_context(PlannedFile(directory / rank_file(r.rank), [(t.name, t.torch_dtype, t.shape) for t in r.tensors],
                                            hashed=True))
            for r in plan.ranks
        ]
        instances = [
            _instance(tensors, tuple(files[first : first + tp]), source, tp)
            for first in range(0, len(plan.ranks), tp)
            for tensors in zip(*(r.tensors for r in plan.ranks[first : first + tp]))
        ]
        instances.sort(key=lambda i: i.cost, reverse=True)

        fallback = threading.Lock()

        def make(instance: _Instance) -> None:
            if not instance.slices:
                whole(instance)
            elif not write_streamed(instance.tensors, instance.files, instance.slices, source):
                with fallback:
                    whole(instance)

        def whole(instance: _Instance) -> None:
            head = instance.tensors[0]
            loaded = [source.load(name) for name in head.sources]
            stored = guard.stored(head, loaded, to_stored(head.ops, loaded, head.torch_dtype))
            for file, tensor in zip(instance.files, instance.tensors):
                file.write(tensor.name, tensor.shard.forward(stored, tp, tensor.tp_rank))

        def report(instance: _Instance) -> None:
            for tensor in instance.tensors:
                progress(tensor.name, math.prod(tensor.shape) * tensor.torch_dtype.itemsize)

        budget = BUDGET_BASE + 2 * max((i.cost for i in instances), default=0)
        with _one_torch_thread():
            run_bounded(instances, make, lambda i: i.held, workers, budget, report if progress else None)
    return {file.path.name: file.digest for file in files}


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """torch ops on one thread each within the block: the workers are the parallelism (measured: torch's intra-op
    pool under the workers made a 2-core conversion twice as slow, docs/performance.md)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
