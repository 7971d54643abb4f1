"""The rank files of a target other than the TensorRT-LLM checkpoint, as the sharded runtime's families read them.

The families execute the checkpoint target's tensors (`transformer.layers.{j}.attention.qkv.weight`, ...). A
target with `runtime_view` is executed through a view derived from the two plans of the same model and mapping,
rank by rank and from that rank's own tensors alone (nothing is reassembled across ranks): a checkpoint-target
tensor is a consecutive dim-0 piece (or the whole) of one target tensor of the same rank. Which piece is found by
running both plans' ops and shards on tags (every source element numbered) instead of weights: `gate_up_proj`'s
`[gate_r; up_r]` holds the checkpoint's `mlp.fc` (gate) and `mlp.gate` (up) as its halves, and a pre-fused HF
`gate_up_proj`, which the checkpoint re-orders to `[up_r; gate_r]`, still gives each half its own rows. The
runtime's config is the checkpoint target's config.json for that model and mapping. Whatever the view cannot
derive is a check not run.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from shardproof.converter.errors import CheckNotRun
from shardproof.converter.plan import Layout, Plan, PlannedTensor, build_plan
from shardproof.converter.target_checkpoint import MetadataCheckpoint
from shardproof.converter.trt_config import trt_config

from .config import load_config
from .family import get_family
from .rank_files import ShardedCheckpoint

Segment = tuple[str, int, int]  # (target tensor name, first row, rows) on dim 0; rows -1: the whole tensor
Piece = tuple[Segment, ...]  # a checkpoint-target tensor: its segments concatenated on dim 0


# The checkpoint target's embedding layouts the view tries, in order: replicated (so that a target holding the whole
# table runs all of it), then vocab-parallel (what most of the PyTorch backend's decoders hold).
EMBEDDINGS = (dict(use_parallel_embedding=False), dict(use_parallel_embedding=True, embedding_sharding_dim=0))


def checkpoint_plans(target_checkpoint: MetadataCheckpoint) -> list[Plan]:
    """The checkpoint target's plans for the same model, dtype and mapping, one per embedding layout (the card's
    layout rule applied)."""
    ckpt = target_checkpoint
    return [build_plan(ckpt.card, ckpt.dims,
                       ckpt.card.layout(Layout(dtype=ckpt.layout.dtype, mapping=ckpt.layout.mapping, **switches),
                                        ckpt.dims),
                       ckpt.source_shapes, str(ckpt.directory))
            for switches in EMBEDDINGS]


def _tagged(tensor: PlannedTensor, tp: int, numbering: dict[str, Tensor]) -> Tensor:
    """The rank tensor as the plan makes it from tags instead of weights: every source element numbered (1, 2, ...;
    0 is what padding gets), the same numbers for the same source wherever it appears; the ops that move values,
    then the shard. (An op that rounds changes values in place only; `_piece` requires the same ones on both.)"""
    tags = []
    for name, shape in zip(tensor.sources, tensor.source_shapes):
        if name not in numbering:
            first = 1 + sum(t.numel() for t in numbering.values())
            numbering[name] = torch.arange(first, first + math.prod(shape), dtype=torch.int64).reshape(shape)
        tags.append(numbering[name])
    for op in tensor.ops:
        if op.exact:
            tags = op.forward_all(tags)
    return tensor.shard.forward(tags, tp, tensor.tp_rank)


def _rounding(tensor: PlannedTensor) -> list:
    return [op for op in tensor.ops if not op.exact]


def _piece(wanted: PlannedTensor, held: list[PlannedTensor], tp: int) -> Piece | None:
    """`wanted` as runs of consecutive dim-0 rows of the `held` tensors of its rank (those sharing a source with it,
    rounded by the same ops), found by matching tags row by row; None when it is not. A held tensor stored in
    another dtype (a router the target keeps in the model's dtype) is read in the wanted one."""
    held = [h for h in held if _rounding(h) == _rounding(wanted) and tuple(h.shape[1:]) == tuple(wanted.shape[1:])]
    for h in held:
        if (h.sources, h.ops, h.shard, h.shape) == (wanted.sources, wanted.ops, wanted.shard, wanted.shape):
            return ((h.name, 0, -1),)
    numbering: dict[str, Tensor] = {}
    tagged = [_tagged(h, tp, numbering) for h in held]
    part = _tagged(wanted, tp, numbering)
    if part.numel() == 0:
        return None
    starts = {}  # the first tag of each held row that has one -> (held index, row)
    for i, t in enumerate(tagged):
        for row, tag in enumerate(t.reshape(t.shape[0], -1)[:, 0].tolist() if t.numel() else []):
            if tag:
                starts[tag] = (i, row)
    segments: list[list[int]] = []  # [held index, first row, rows], in the order they make `wanted`
    for tag in part.reshape(part.shape[0], -1)[:, 0].tolist():
        here = starts.get(tag) if tag else None  # a padding row (tag 0) continues the run it is in
        if segments and (here is None or here == (segments[-1][0], segments[-1][1] + segments[-1][2])):
            segments[-1][2] += 1
        elif here is None:
            return None
        else:
            segments.append([*here, 1])
    offset = 0
    for i, first, rows in segments:
        if first + rows > tagged[i].shape[0] or not torch.equal(tagged[i].narrow(0, first, rows),
                                                                part.narrow(0, offset, rows)):
            return None
        offset += rows
    return tuple((held[i].name, 0, -1) if rows == tagged[i].shape[0] else (held[i].name, first, rows)
                 for i, first, rows in segments)


def _structure(t: PlannedTensor) -> tuple:
    return (t.source_shapes, t.ops, t.shard, t.dtype, t.shape)


def _pieces(wanted: list[PlannedTensor], held: list[PlannedTensor], tp: int, known: dict) -> dict[str, Piece]:
    """Where each checkpoint-target tensor of one rank lies among the target tensors of that rank. Layers repeat
    the same structure, so each structure is derived once, remembered in `known` (tags take one int64 per source
    element)."""
    holding: dict[str, list[PlannedTensor]] = {}
    for h in held:
        for name in dict.fromkeys(h.sources):
            holding.setdefault(name, []).append(h)
    out: dict[str, Piece] = {}
    for w in wanted:
        candidates = list({id(h): h for s in w.sources for h in holding.get(s, [])}.values())
        key = (_structure(w), tuple(_structure(h) for h in candidates),
               tuple(tuple(h.sources.index(s) if s in h.sources else -1 for h in candidates) for s in w.sources))
        if key not in known:
            piece = _piece(w, candidates, tp)
            known[key] = None if piece is None else tuple(
                (next(i for i, h in enumerate(candidates) if h.name == name), first, rows) for name, first, rows in piece)
        if known[key] is None:
            raise CheckNotRun(f"the sharded runtime cannot read {w.name} from this target's rank files")
        out[w.name] = tuple((candidates[i].name, first, rows) for i, first, rows in known[key])
    return out


class _ViewFile:
    """One rank of the view with `RankFile`'s interface: names, shapes and dtypes from the checkpoint target's plan,
    each tensor assembled from the rank's own target tensors when it is read (nothing kept)."""

    def __init__(self, source: MetadataCheckpoint, rank: int, pieces: dict[str, Piece], planned: list[PlannedTensor]):
        self.source, self.rank, self.pieces = source, rank, pieces
        self.path = source.rank_path(rank)
        self.shapes = {t.name: t.shape for t in planned}
        self._dtypes = {t.name: t.torch_dtype for t in planned}

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def read(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Tensor:
        parts = []
        for held, first, rows in self.pieces[name]:
            try:
                tensor = self.source.load(self.rank, held)
            except Exception as e:  # a missing file or tensor is the structural check's to report
                raise ValueError(f"{self.path}: cannot read {held} ({e})") from None
            parts.append(tensor if rows < 0 else tensor.narrow(0, first, rows))
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(self._dtypes[name]).to(device).to(dtype or self._dtypes[name])


class TargetShardedCheckpoint(ShardedCheckpoint):
    """A `ShardedCheckpoint` whose rank files are the view above of a `MetadataCheckpoint`'s rank files."""

    def __init__(self, target_checkpoint: MetadataCheckpoint) -> None:
        self.path = target_checkpoint.directory
        self.source = target_checkpoint
        held = {rank.rank: list(rank.tensors) for rank in target_checkpoint.plan.ranks}
        tp, known = target_checkpoint.layout.mapping.tp_size, {}
        for plan in checkpoint_plans(target_checkpoint):
            try:
                self._pieces = {rank.rank: _pieces(list(rank.tensors), held[rank.rank], tp, known)
                                for rank in plan.ranks}
                break
            except CheckNotRun as e:
                cannot = e
        else:
            raise cannot
        self._planned = {rank.rank: list(rank.tensors) for rank in plan.ranks}
        with tempfile.TemporaryDirectory(prefix="shardproof-view-") as tmp:
            config = Path(tmp) / "config.json"
            config.write_text(json.dumps(trt_config(plan, target_checkpoint.hf)))
            self.config = load_config(config)
        self.family = get_family(self.config.forward)
        self._files: dict[int, _ViewFile] = {}

    def file(self, rank: int) -> _ViewFile:
        if not 0 <= rank < self.config.world_size:
            raise ValueError(f"{self.path}: rank {rank} outside world_size {self.config.world_size}")
        if rank not in self._files:
            self._files[rank] = _ViewFile(self.source, rank, self._pieces[rank], self._planned[rank])
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
