"""Runs a plan: streams each rank file tensor by tensor from the source checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .dtypes import TORCH_DTYPES
from .plan import Plan
from .safetensors_io import StreamWriter
from .source import HFCheckpoint

Progress = Callable[[str], None]


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def write_checkpoint(plan: Plan, source: HFCheckpoint, directory: Path, config: dict, progress: Progress | None = None) -> None:
    """Write config.json and every rank file of `plan` into `directory`; memory holds one tensor at a time."""
    dtype, tp = plan.layout.dtype, plan.layout.mapping.tp_size
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for rank in plan.ranks:
        entries = [(t.name, TORCH_DTYPES[dtype], t.shape) for t in rank.tensors]
        with StreamWriter(directory / rank_file(rank.rank), entries) as writer:
            for tensor in rank.tensors:
                sources = [source.load(name, dtype) for name in tensor.sources]
                writer.write(tensor.name, tensor.shard.forward(sources, tp, tensor.tp_rank))
                if progress:
                    progress(tensor.name)
