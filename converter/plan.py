"""The conversion plan: every tensor of every rank, its sources, ops, shard and dtype, built from shapes alone.

`build_plan` fails closed before any tensor data is read: every source tensor must be consumed by a row or
skipped by a named rule, every row's sources must exist with the shapes the config implies, every shard must
divide, and every target must be produced exactly once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections import defaultdict
from dataclasses import dataclass

import torch

from .card import Card, Dims, Row, Shape, TargetRows
from .dtypes import TORCH_DTYPES
from .errors import ShardproofError
from .mapping import Mapping
from .transforms import Shard, SourceOp, rank_shape, resolve_ops, round_trip, stored_shapes

DEFAULT_TARGET = "trtllm-checkpoint"


@dataclass(frozen=True)
class Layout:
    """How the converted checkpoint is laid out: dtype, parallelism, the embedding's sharding and whether the
    embedding table doubles as lm_head (set by a card's layout rule; then no lm_head is stored)."""

    dtype: str
    mapping: Mapping
    use_parallel_embedding: bool = False
    embedding_sharding_dim: int = 0
    share_embedding_table: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in TORCH_DTYPES:
            raise ShardproofError(f"dtype {self.dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
        if self.embedding_sharding_dim not in (0, 1):
            raise ShardproofError(f"embedding_sharding_dim={self.embedding_sharding_dim} must be 0 or 1")

    @property
    def pipeline(self) -> bool:
        """More than one pipeline stage (a row condition)."""
        return self.mapping.pp_size > 1


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of one rank file: name, shape, dtype, the source tensors, their ops and the shard.

    `source_shapes` are the source tensors' shapes; `stored_shapes` the shapes after the ops, which the shard splits.
    """

    name: str
    shape: Shape
    dtype: str
    sources: tuple[str, ...]
    source_shapes: tuple[Shape, ...]
    shard: Shard
    tp_rank: int
    pp_rank: int
    ops: tuple[SourceOp, ...] = ()

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    @property
    def stored_shapes(self) -> tuple[Shape, ...]:
        """The shapes the shard works on: the source shapes after the ops (chunked, reordered, transposed)."""
        return stored_shapes(self.ops, self.source_shapes)


@dataclass(frozen=True)
class RankPlan:
    rank: int
    tp_rank: int
    pp_rank: int
    layers: range
    tensors: tuple[PlannedTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(t.shape) * t.torch_dtype.itemsize for t in self.tensors)


@dataclass(frozen=True)
class Plan:
    card: Card
    dims: Dims
    layout: Layout
    ranks: tuple[RankPlan, ...]
    skipped: dict[str, str]
    ignored_fields: dict[str, str] = dataclasses.field(default_factory=dict)  # source config fields, with reasons
    target: str = DEFAULT_TARGET  # the target layout (converter/target.py) the ranks are laid out in

    def groups(self) -> list[list[PlannedTensor]]:
        """The tensors that one row instance spreads over a TP group, each list ordered by tp_rank."""
        grouped: dict[tuple[int, str], list[PlannedTensor]] = defaultdict(list)
        for rank in self.ranks:
            for tensor in rank.tensors:
                grouped[(tensor.pp_rank, tensor.name)].append(tensor)
        return [sorted(group, key=lambda t: t.tp_rank) for group in grouped.values()]

    @functools.cached_property
    def _source_tensors(self) -> dict[str, PlannedTensor]:
        return {s: t for rank in self.ranks for t in rank.tensors for s in t.sources}

    def reassembled_value(self, name: str, source: torch.Tensor) -> torch.Tensor:
        """What reassembly must give back for source tensor `name`: the cast, and its ops' declared rounding."""
        planned = self._source_tensors.get(name)
        if planned is None:
            return source.to(TORCH_DTYPES[self.layout.dtype])
        return round_trip(planned.ops, source, planned.torch_dtype)

    def rounded_sources(self) -> list[str]:
        """Source tensors whose ops round, so that reassembly gives back a rounded value, not the cast alone."""
        return [name for name, t in self._source_tensors.items() if not all(op.exact for op in t.ops)]


def holds(condition: str | None, dims: Dims, layout: Layout) -> bool:
    """A row's condition: `&`-joined switch names, each optionally negated with `!`, looked up on the model's
    dims first, then on the layout."""
    if condition is None:
        return True
    for term in (t.strip() for t in condition.split("&")):
        name = term.lstrip("!")
        value = getattr(dims, name) if hasattr(dims, name) else getattr(layout, name)
        if bool(value) == term.startswith("!"):
            return False
    return True


class TargetLike(typing.Protocol):
    """What planning needs of a target (`converter/target.py`): its name, its rows for a card, and whether layer
    names carry the global layer index."""

    name: str
    global_layers: bool

    def rows(self, card: Card) -> TargetRows: ...


def _instances(row: Row, layers: range, dims: Dims, target: TargetLike | None, held: TargetRows,
               next_layer: int | None) -> list[tuple[str, tuple[str, ...]]]:
    """A row's (target, sources) on a stage holding `layers`, plus the next stage's first layer for a row the
    target keeps there (`TargetRows.next_stage`)."""
    global_index = bool(target and target.global_layers)
    out = row.instances(layers, dims, global_index)
    if next_layer is not None and row.target in held.next_stage:
        out += row.instances(range(next_layer, next_layer + 1), dims, global_index=True)
    return out


def check_not_refused(card: Card, dims: Dims, layout: Layout, target: TargetLike | None, where: str) -> None:
    """ShardproofError when `target` cannot build this model in this layout (its `TargetRows.refused`)."""
    for condition, reason in (target.rows(card).refused if target else ()):
        if holds(condition, dims, layout):
            raise ShardproofError(f"{where}: {card.name} ({condition}) cannot be laid out in target {target.name}: {reason}")


def build_plan(card: Card, dims: Dims, layout: Layout, source_shapes: dict[str, Shape], where: str,
               target: TargetLike | None = None) -> Plan:
    """Plan a conversion from the source tensors' shapes; `where` names the source in error messages. `target`
    None lays the ranks out as a TensorRT-LLM checkpoint (the card's own rows)."""
    mapping = layout.mapping
    expected = card.source_shapes(dims)
    held = target.rows(card) if target else TargetRows(card.rows)
    check_not_refused(card, dims, layout, target, where)
    rows = [row for row in held.rows if holds(row.when, dims, layout)]
    consumed: set[str] = set()
    ranks = []
    for rank in range(mapping.world_size):
        tp_rank, pp_rank = mapping.coords(rank)
        layers = mapping.stage_layers(dims.num_layers, pp_rank)
        next_layer = layers[-1] + 1 if pp_rank < mapping.pp_size - 1 else None
        tensors: dict[str, PlannedTensor] = {}
        for row in rows:
            if row.stage == "first" and pp_rank != 0 or row.stage == "last" and pp_rank != mapping.pp_size - 1:
                continue
            shard = row.shard.resolve(dims, layout)
            ops = resolve_ops(row.ops, dims, layout)
            for target_name, sources in _instances(row, layers, dims, target, held, next_layer):
                shapes = tuple(
                    _source_shape(name, pattern, row, expected, source_shapes, where)
                    for pattern, name in zip(row.patterns(dims), sources)
                )
                stored = stored_shapes(ops, shapes)
                if len(stored) != shard.n_sources:
                    raise ValueError(f"row {row.target}: its {shard.kind} shard takes {shard.n_sources} tensor(s), "
                                     f"its sources and ops give {len(stored)}")
                why = shard.check(stored, mapping.tp_size)
                if why:
                    raise ShardproofError(f"{where}: cannot shard {target_name} over tp_size={mapping.tp_size}: {why}")
                if target_name in tensors:
                    raise ShardproofError(f"{card.name}: rank {rank} would get {target_name} twice")
                local = rank_shape(shard, stored, mapping.tp_size, tp_rank)
                dtype = row.dtype or layout.dtype
                tensors[target_name] = PlannedTensor(target_name, local, dtype, sources, shapes, shard, tp_rank,
                                                     pp_rank, ops)
                consumed.update(sources)
        ranks.append(RankPlan(rank, tp_rank, pp_rank, layers, tuple(tensors.values())))
    skipped = {}
    unmapped = []
    for name in source_shapes:
        if name in consumed:
            continue
        skip = next((s for s in card.skips if holds(s.when, dims, layout) and s.matches(name)), None)
        if skip is None:
            unmapped.append(name)
        else:
            skipped[name] = skip.reason
    if unmapped:
        more = f" and {len(unmapped) - 3} more" if len(unmapped) > 3 else ""
        raise ShardproofError(
            f"{where}: tensor(s) {', '.join(unmapped[:3])}{more} are not mapped by any {card.name} row "
            "(check the config's switches, e.g. attention_bias, tie_word_embeddings)"
        )
    return Plan(card, dims, layout, tuple(ranks), skipped, target=target.name if target else DEFAULT_TARGET)


def _source_shape(name: str, pattern: str, row: Row, expected: dict[str, Shape], actual: dict[str, Shape], where: str) -> Shape:
    if pattern not in expected:
        raise ValueError(f"row {row.target}: source {pattern} has no entry in the card's shape table")
    if name not in actual:
        raise ShardproofError(f"{where}: tensor {name} is missing (needed for {row.target})")
    if tuple(actual[name]) != expected[pattern]:
        raise ShardproofError(
            f"{where}: tensor {name} has shape {list(actual[name])} but config.json implies {list(expected[pattern])}"
        )
    return expected[pattern]


def expected_source_shapes(card: Card, dims: Dims, layout: Layout, target: TargetLike | None = None) -> dict[str, Shape]:
    """The source tensors (names and shapes) that a model with these dims must have: the reassembler's target."""
    shapes = card.source_shapes(dims)
    names = {}
    for row in (target.rows(card) if target else TargetRows(card.rows)).rows:
        if not holds(row.when, dims, layout):
            continue
        for _, sources in row.instances(range(dims.num_layers), dims):
            for pattern, name in zip(row.patterns(dims), sources):
                names[name] = shapes[pattern]
    return names

