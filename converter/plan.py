"""The conversion plan: every tensor of every rank, its sources and its shard, built from shapes alone.

`build_plan` fails closed before any tensor data is read: every source tensor must be consumed by a rule or
skipped by a named rule, every rule's sources must exist with the shapes the config implies, every shard must
divide, and every target must be produced exactly once.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from .architecture import Architecture, ModelDims, Rule, Shape, ShardKind
from .dtypes import TORCH_DTYPES
from .errors import ShardproofError
from .format_ops import FormatOp
from .mapping import Mapping
from .sharding import COLUMN, REPLICATED, ROW, VOCAB, FusedQKV, Shard


@dataclass(frozen=True)
class Layout:
    """How the converted checkpoint is laid out: dtype, parallelism and the embedding's sharding."""

    dtype: str
    mapping: Mapping
    use_parallel_embedding: bool = False
    embedding_sharding_dim: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in TORCH_DTYPES:
            raise ShardproofError(f"dtype {self.dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
        if self.embedding_sharding_dim not in (0, 1):
            raise ShardproofError(f"embedding_sharding_dim={self.embedding_sharding_dim} must be 0 or 1")


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of one rank file: name, shape, the source tensors and the shard that makes it."""

    name: str
    shape: Shape
    sources: tuple[str, ...]
    source_shapes: tuple[Shape, ...]
    shard: Shard
    tp_rank: int
    pp_rank: int
    op: FormatOp | None = None


@dataclass(frozen=True)
class RankPlan:
    rank: int
    tp_rank: int
    pp_rank: int
    layers: range
    tensors: tuple[PlannedTensor, ...]


@dataclass(frozen=True)
class Plan:
    architecture: Architecture
    dims: ModelDims
    layout: Layout
    ranks: tuple[RankPlan, ...]
    skipped: dict[str, str]

    @property
    def itemsize(self) -> int:
        return TORCH_DTYPES[self.layout.dtype].itemsize

    def rank_bytes(self, rank: int) -> int:
        return sum(math.prod(t.shape) for t in self.ranks[rank].tensors) * self.itemsize

    def groups(self) -> list[list[PlannedTensor]]:
        """The tensors that one rule instance spreads over a TP group, each list ordered by tp_rank."""
        grouped: dict[tuple[int, str], list[PlannedTensor]] = defaultdict(list)
        for rank in self.ranks:
            for tensor in rank.tensors:
                grouped[(tensor.pp_rank, tensor.name)].append(tensor)
        return [sorted(group, key=lambda t: t.tp_rank) for group in grouped.values()]

    @functools.cached_property
    def _source_ops(self) -> dict[str, FormatOp]:
        return {s: t.op for rank in self.ranks for t in rank.tensors if t.op for s in t.sources}

    def reassembled_value(self, name: str, source: torch.Tensor) -> torch.Tensor:
        """What reassembly must give back for source tensor `name`: the cast, and its format op's rounding."""
        dtype = TORCH_DTYPES[self.layout.dtype]
        op = self._source_ops.get(name)
        return op.round_trip(source, dtype) if op else source.to(dtype)


def _resolve(kind: ShardKind, dims: ModelDims, layout: Layout) -> Shard:
    if kind == "qkv":
        return FusedQKV(dims.num_heads, dims.num_kv_heads, dims.head_dim)
    if kind == "embedding":
        if not layout.use_parallel_embedding:
            return REPLICATED
        return VOCAB if layout.embedding_sharding_dim == 0 else ROW
    return {"replicated": REPLICATED, "column": COLUMN, "row": ROW, "vocab": VOCAB}[kind]


def _instances(rule: Rule, layers: range) -> list[tuple[str, tuple[str, ...]]]:
    """(target, sources) names of a rule on a stage; layer targets use the stage-local index."""
    if rule.stage != "layer":
        return [(rule.target, rule.sources)]
    return [
        (rule.target.format(i=local), tuple(s.format(i=layer) for s in rule.sources))
        for local, layer in enumerate(layers)
    ]


def build_plan(
    arch: Architecture, dims: ModelDims, layout: Layout, source_shapes: dict[str, Shape], where: str
) -> Plan:
    """Plan a conversion from the source tensors' shapes; `where` names the source in error messages."""
    mapping = layout.mapping
    expected = arch.source_shapes(dims)
    rules = [rule for rule in arch.rules if dims.holds(rule.when)]
    consumed: set[str] = set()
    ranks = []
    for rank in range(mapping.world_size):
        tp_rank, pp_rank = mapping.coords(rank)
        layers = mapping.stage_layers(dims.num_layers, pp_rank)
        tensors: dict[str, PlannedTensor] = {}
        for rule in rules:
            if rule.stage == "first" and pp_rank != 0 or rule.stage == "last" and pp_rank != mapping.pp_size - 1:
                continue
            shard = _resolve(rule.shard, dims, layout)
            for target, sources in _instances(rule, layers):
                shapes = tuple(
                    _source_shape(name, pattern, rule, expected, source_shapes, where)
                    for pattern, name in zip(rule.sources, sources)
                )
                why = shard.check(shapes, mapping.tp_size)
                if why:
                    raise ShardproofError(f"{where}: cannot shard {target} over tp_size={mapping.tp_size}: {why}")
                if target in tensors:
                    raise ShardproofError(f"{arch.name}: rank {rank} would get {target} twice")
                local = shard.local_shape(shapes, mapping.tp_size)
                tensors[target] = PlannedTensor(target, local, sources, shapes, shard, tp_rank, pp_rank, rule.op)
                consumed.update(sources)
        ranks.append(RankPlan(rank, tp_rank, pp_rank, layers, tuple(tensors.values())))
    skipped = {}
    unmapped = []
    for name in source_shapes:
        if name in consumed:
            continue
        skip = next((s for s in arch.skips if dims.holds(s.when) and s.matches(name)), None)
        if skip is None:
            unmapped.append(name)
        else:
            skipped[name] = skip.reason
    if unmapped:
        more = f" and {len(unmapped) - 3} more" if len(unmapped) > 3 else ""
        raise ShardproofError(
            f"{where}: tensor(s) {', '.join(unmapped[:3])}{more} are not mapped by any {arch.name} rule "
            "(check the config's switches, e.g. attention_bias, tie_word_embeddings)"
        )
    return Plan(arch, dims, layout, tuple(ranks), skipped)


def _source_shape(
    name: str, pattern: str, rule: Rule, expected: dict[str, Shape], actual: dict[str, Shape], where: str
) -> Shape:
    if pattern not in expected:
        raise ValueError(f"rule {rule.target}: source {pattern} has no entry in the architecture's shape table")
    if name not in actual:
        raise ShardproofError(f"{where}: tensor {name} is missing (needed for {rule.target})")
    if tuple(actual[name]) != expected[pattern]:
        raise ShardproofError(
            f"{where}: tensor {name} has shape {list(actual[name])} but config.json implies {list(expected[pattern])}"
        )
    return expected[pattern]


def expected_source_shapes(arch: Architecture, dims: ModelDims) -> dict[str, Shape]:
    """The source tensors (names and shapes) that a model with these dims must have: the reassembler's target."""
    shapes = arch.source_shapes(dims)
    names = {}
    for rule in arch.rules:
        if not dims.holds(rule.when):
            continue
        layers = range(dims.num_layers) if rule.stage == "layer" else [None]
        for layer in layers:
            for pattern in rule.sources:
                names[pattern.format(i=layer) if layer is not None else pattern] = shapes[pattern]
    return names
