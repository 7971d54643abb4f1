"""The rank files of a target other than the TensorRT-LLM checkpoint, as the sharded runtime's families read them.

The families execute the checkpoint target's tensors (`transformer.layers.{j}.attention.qkv.weight`, ...). A
target with `runtime_view` is executed through a view derived from the two plans of the same model and mapping,
rank by rank and from that rank's own tensors alone (nothing is reassembled across ranks): a checkpoint-target
tensor is the target tensor made from the same sources on the same rank, or, when a target tensor fuses the
sources of several checkpoint-target tensors (`gate_up_proj` holds `[gate_r; up_r]`, which the checkpoint keeps
as `mlp.fc` and `mlp.gate`), its consecutive dim-0 pieces in source order. The runtime's config is the
checkpoint target's config.json for that model and mapping. Whatever the view cannot derive is a check not run.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from shardproof.converter.errors import CheckNotRun
from shardproof.converter.plan import Layout, Plan, PlannedTensor, build_plan
from shardproof.converter.target import CHECKPOINT
from shardproof.converter.target_checkpoint import MetadataCheckpoint
from shardproof.converter.trt_config import trt_config

from .config import load_config
from .family import get_family
from .rank_files import ShardedCheckpoint

Piece = tuple[str, int, int]  # (target tensor name, first row, rows) on dim 0; rows -1: the whole tensor


def checkpoint_plan(target_checkpoint: MetadataCheckpoint) -> Plan:
    """The checkpoint target's plan for the same model, dtype and mapping (its card's layout rule applied to a
    vocab-parallel embedding, as the PyTorch backend's)."""
    ckpt = target_checkpoint
    layout = ckpt.card.layout(Layout(dtype=ckpt.layout.dtype, mapping=ckpt.layout.mapping,
                                     use_parallel_embedding=True, embedding_sharding_dim=0), ckpt.dims)
    return build_plan(ckpt.card, ckpt.dims, layout, ckpt.source_shapes, str(ckpt.directory))


def _pieces(wanted: list[PlannedTensor], held: list[PlannedTensor]) -> dict[str, Piece]:
    """Where each checkpoint-target tensor of one rank lies among the target tensors of that rank."""
    by_sources = {t.sources: t for t in held}
    out: dict[str, Piece] = {}
    for fused in held:
        parts = [w for w in wanted if w.sources != fused.sources and set(w.sources) <= set(fused.sources)]
        parts.sort(key=lambda w: fused.sources.index(w.sources[0]))
        if parts and sum((w.sources for w in parts), ()) == fused.sources \
                and sum(w.shape[0] for w in parts) == fused.shape[0]:
            row = 0
            for w in parts:
                out[w.name] = (fused.name, row, w.shape[0])
                row += w.shape[0]
    for w in wanted:
        same = by_sources.get(w.sources)
        if w.name not in out and same is not None and same.shape == w.shape and same.ops == w.ops:
            out[w.name] = (same.name, 0, -1)
    missing = [w.name for w in wanted if w.name not in out]
    if missing:
        raise CheckNotRun(f"the sharded runtime cannot read {', '.join(missing[:3])} from this target's rank files")
    return out


class TargetShardedCheckpoint(ShardedCheckpoint):
    """A `ShardedCheckpoint` whose rank tensors are the view above of a `MetadataCheckpoint`'s rank files."""

    def __init__(self, target_checkpoint: MetadataCheckpoint) -> None:
        self.path = target_checkpoint.directory
        self.source = target_checkpoint
        plan = checkpoint_plan(target_checkpoint)
        with tempfile.TemporaryDirectory(prefix="shardproof-view-") as tmp:
            config = Path(tmp) / "config.json"
            config.write_text(json.dumps(trt_config(plan, target_checkpoint.hf)))
            self.config = load_config(config)
        self.family = get_family(self.config.forward)
        held = {rank.rank: list(rank.tensors) for rank in target_checkpoint.plan.ranks}
        self._pieces = {rank.rank: _pieces(list(rank.tensors), held[rank.rank]) for rank in plan.ranks}
        self._files: dict[int, dict[str, Tensor]] = {}

    def tensors(self, rank: int) -> dict[str, Tensor]:
        if rank not in self._files:
            if not 0 <= rank < self.config.world_size:
                raise ValueError(f"{self.path}: rank {rank} outside world_size {self.config.world_size}")
            source = self.source
            out = {}
            for name, (held, first, rows) in self._pieces[rank].items():
                try:
                    tensor = source.load(rank, held)
                except Exception as e:  # a missing file or tensor is the structural check's to report
                    raise ValueError(f"{source.rank_path(rank)}: cannot read {held} ({e})") from None
                out[name] = tensor if rows < 0 else tensor.narrow(0, first, rows)
            self._files[rank] = out
        return self._files[rank]


def open_sharded(checkpoint_dir: Path | str, target=None, model_dir: Path | str | None = None) -> ShardedCheckpoint:
    """The rank files at `checkpoint_dir` as the sharded runtime reads them, for `target` (default: the
    TensorRT-LLM checkpoint, read directly)."""
    from shardproof.converter.target import get_target

    target = get_target(target)
    if not target.runtime_view:
        return ShardedCheckpoint(checkpoint_dir)
    ckpt = MetadataCheckpoint(checkpoint_dir, target, model_dir)
    violations = ckpt.structural_violations()
    if violations:
        raise ValueError(f"{violations[0]}" + (f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""))
    return TargetShardedCheckpoint(ckpt)
