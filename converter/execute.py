"""Runs a plan: streams the rank files of each pipeline stage tensor by tensor from the source checkpoint."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable

from .manifest import FileDigest
from .plan import Plan
from .safetensors_io import StreamWriter
from .source import HFCheckpoint
from .transforms import to_stored
from .value_range import ValueGuard

Progress = Callable[[str], None]


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def write_checkpoint(plan: Plan, source: HFCheckpoint, directory: Path, config: dict, progress: Progress | None = None,
                     guard: ValueGuard | None = None, digests: dict[str, FileDigest] | None = None) -> None:
    """Write config.json and every rank file of `plan` into `directory`.

    The TP ranks of a stage plan the same tensor names in the same order, so each source tensor is read once
    and its shards go to the stage's rank files together: memory holds one source tensor and its shards.
    `guard` judges every stored tensor's values (default: refuse non-finite ones); `digests` receives each rank
    file's SHA-256 and size, computed as it is written.
    """
    tp = plan.layout.mapping.tp_size
    guard = guard or ValueGuard(str(source.model_dir))
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for first in range(0, len(plan.ranks), tp):
        stage = plan.ranks[first : first + tp]
        with contextlib.ExitStack() as stack:
            writers = [
                stack.enter_context(StreamWriter(directory / rank_file(r.rank), [(t.name, t.torch_dtype, t.shape) for t in r.tensors], digests))
                for r in stage
            ]
            for tensors in zip(*(r.tensors for r in stage)):
                head = tensors[0]
                loaded = [source.load(name) for name in head.sources]
                sources = guard.stored(head, loaded, to_stored(head.ops, loaded, head.torch_dtype))
                for writer, tensor in zip(writers, tensors):
                    writer.write(tensor.name, tensor.shard.forward(sources, tp, tensor.tp_rank))
                    if progress:
                        progress(tensor.name)
