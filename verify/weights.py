"""Tensor-by-tensor comparison of the tensors the rank files give back with the source cast to the checkpoint's dtype.

Conversion is data movement plus one cast (and, for a tensor made through an op that rounds, such as a norm stored as
1 + weight, that op's declared rounding); the source goes through the same here, so every tensor must be bit-identical: there
is no tolerance. A tensor that differs is also traced back to the rank files that hold
it, by re-running its shard on the source and comparing with what each rank stores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from shardproof.converter.checkpoint import TRTCheckpoint, Violation
from shardproof.converter.plan import PlannedTensor, holds
from shardproof.converter.reassemble import Rebuild, invert_group, inverted_on, rebuild
from shardproof.converter.source import Source
from shardproof.converter.transforms import to_stored

from .metrics import first_difference, max_abs_diff
from .rank_reads import RankReads, rank_key
from .streaming import Progress, Unit


@dataclass(frozen=True)
class TensorComparison:
    """One source tensor against its reassembled counterpart; `problem` says why it could not be compared."""

    name: str
    shape: tuple[int, ...]
    equal: bool
    max_abs_diff: float = 0.0
    first_diff_index: tuple[int, ...] | None = None
    problem: str | None = None


@dataclass(frozen=True)
class RankDifference:
    """A rank file's tensor that differs from what sharding the source would have written."""

    rank: int
    tensor: str
    sources: tuple[str, ...]
    max_abs_diff: float
    first_diff_index: tuple[int, ...] | None


@dataclass
class WeightComparison:
    """Every source tensor compared; `skipped` are source tensors not converted on purpose (name -> reason)."""

    JSON_PROPERTIES: ClassVar[tuple[str, ...]] = ("ok",)

    dtype: str
    tensors: list[TensorComparison]
    skipped: dict[str, str] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)
    ranks: list[RankDifference] = field(default_factory=list, metadata={"json": "rank_differences"})

    @property
    def mismatches(self) -> list[TensorComparison]:
        return [t for t in self.tensors if not t.equal]

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.extra


class WeightCheck:
    """The comparison of every source tensor with what the rank files give back, one pair at a time, in any
    order (`compare`); `result` once every rebuilt tensor has been offered. `device`: where pairs are compared."""

    def __init__(self, source: Source, checkpoint: TRTCheckpoint, device: torch.device = torch.device("cpu")) -> None:
        self.source, self.checkpoint, self.device = source, checkpoint, device
        self._rounded = set(checkpoint.plan.rounded_sources())
        self._result = WeightComparison(checkpoint.layout.dtype, [])

    def compare(self, name: str, actual: torch.Tensor, group: list[PlannedTensor],
                stored: torch.Tensor | None = None) -> None:
        """Source tensor `name` against `actual`, which `group` gave back; `stored`: the source tensor as stored,
        when already read (on the device), else it is read here.

        The expected value is `Plan.reassembled_value`: the cast, through its ops' round trip where one rounds
        (computed on the host, where conversion computed it). On a GPU the pair is compared there; a pair that
        differs there is compared again on the host, whose cast is the one conversion used (a device's cast may
        spell a NaN otherwise), so the device only speeds up the common case and never decides a difference."""
        source, plan, result = self.source, self.checkpoint.plan, self._result
        if name not in source.shapes:
            result.extra.append(name)
            return
        shape = tuple(source.shapes[name])
        on_host = name in self._rounded or self.device.type == "cpu"
        if stored is None or (on_host and stored.device.type != "cpu"):
            stored = source.load(name, None if on_host else self.device)
        expected = plan.reassembled_value(name, stored).to(actual.device)
        if tuple(actual.shape) != shape or actual.dtype != expected.dtype:
            problem = f"{actual.dtype} {list(actual.shape)} in the checkpoint, {expected.dtype} {list(shape)} expected"
            result.tensors.append(TensorComparison(name, shape, False, math.inf, None, problem))
            return
        index = first_difference(expected, actual)
        if index is not None and actual.device.type != "cpu":
            sources, _, _ = invert_group(self.checkpoint, group)
            actual = sources[group[0].sources.index(name)]
            expected = plan.reassembled_value(name, source.load(name))
            index = first_difference(expected, actual)
        diff = 0.0 if index is None else max_abs_diff(expected, actual)
        result.tensors.append(TensorComparison(name, shape, index is None, diff, index))

    def result(self) -> WeightComparison:
        """The comparison: source tensors never offered are skipped (by a rule of the card, decided from the
        source's own config) or missing; differing tensors traced to the rank files (`locate_in_ranks`)."""
        source, checkpoint, result = self.source, self.checkpoint, self._result
        compared = {t.name for t in result.tensors}
        source_dims = checkpoint.card.config.dims_from_hf(source.hf_config)
        for name, shape in source.shapes.items():
            if name in compared:
                continue
            skip = next((s for s in checkpoint.card.skips
                         if holds(s.when, source_dims, checkpoint.layout) and s.matches(name)), None)
            if skip is not None:
                result.skipped[name] = skip.reason
            else:
                result.tensors.append(TensorComparison(name, tuple(shape), False, math.inf, None, "missing from the checkpoint"))
        result.extra.sort()
        result.ranks = locate_in_ranks(source, checkpoint, {t.name for t in result.mismatches})
        return result


def compare_weights(
    source: Source,
    checkpoint: TRTCheckpoint,
    violations: list[Violation],
    progress: Progress | None = None,
    device: torch.device = torch.device("cpu"),
) -> WeightComparison:
    """Rebuild every source tensor from the rank files (`rebuild`: what its inverses find is appended to
    `violations`) and compare it with the source's (`WeightCheck`): one pass over the rank files and the source,
    one tensor pair in memory at a time; `progress` gets each source tensor's bytes once compared. Source tensors
    the checkpoint's architecture skips (rotary frequencies, a tied lm_head) are listed, not compared."""
    check = WeightCheck(source, checkpoint, device)
    for name, actual, group in rebuild(checkpoint, violations, device if device.type != "cpu" else None):
        check.compare(name, actual, group)
        del actual
        if progress and name in source.shapes:
            progress(source.nbytes(name))
    return check.result()


class RebuiltUnits:
    """The checkpoint's model for a streamed run beside the source's (`Pass.tensors`, verify/lockstep.py): each
    unit's tensors inverted from the rank files (`Rebuild`, its findings appended to `violations`) and compared
    with the source's as stored, which the lock step has in hand (`WeightCheck`), so one read of each serves the
    weights comparison and both models' runs. `result` inverts and compares what no unit asked for (a tied
    lm_head's copy) and gives the comparison."""

    def __init__(self, source: Source, checkpoint: TRTCheckpoint, violations: list[Violation],
                 device: torch.device, reads: RankReads | None = None) -> None:
        self._check = WeightCheck(source, checkpoint, device)
        self._groups = checkpoint.plan.groups()
        device = device if device.type != "cpu" else None
        load = None
        if reads is not None:  # the rank tensors the runtime reads too, read once for both (verify/rank_reads.py)
            mapping = checkpoint.mapping

            def path(group: list[PlannedTensor], tensor: PlannedTensor) -> Path:
                return checkpoint.rank_path(mapping.rank(tensor.tp_rank, group[0].pp_rank))

            reads.declare(rank_key(path(g, t), t.name, inverted_on(g, device)) for g in self._groups for t in g)

            def load(rank: int, name: str, where: torch.device | None) -> torch.Tensor:
                return reads.read(rank_key(checkpoint.rank_path(rank), name, where),
                                  lambda: checkpoint.load(rank, name, where))

        self._rebuild = Rebuild(checkpoint, violations, device, load)
        self._group_of = {}
        for index, group in enumerate(self._groups):
            for name in group[0].sources:
                self._group_of.setdefault(name, index)
        self._inverted: set[int] = set()
        self._pending: dict[str, torch.Tensor] = {}  # given back by a group for a unit still to come

    def __call__(self, unit: Unit, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`unit`'s tensors, each compared with `stored` (the source's tensors of the unit, as stored)."""
        for key in unit.keys:
            if key in self._pending:
                continue
            tied = self._rebuild.kept(key)  # asked for again (a tied lm_head loads the embedding's)
            if tied is not None:
                self._pending[key] = tied
            else:
                self._invert(self._group_of[key], stored)
        return {key: self._pending.pop(key) for key in unit.keys}

    def _invert(self, index: int, stored: dict[str, torch.Tensor]) -> None:
        self._inverted.add(index)
        group = self._groups[index]
        given, _ = self._rebuild.group(group)
        for name, tensor in given:
            self._check.compare(name, tensor, group, stored.get(name))
            self._pending[name] = tensor

    def result(self) -> WeightComparison:
        self._pending.clear()
        for index in range(len(self._groups)):
            if index not in self._inverted:
                self._invert(index, {})
                self._pending.clear()
        return self._check.result()


def locate_in_ranks(source: Source, checkpoint: TRTCheckpoint, names: set[str]) -> list[RankDifference]:
    """The rank-file tensors made from any of the source tensors `names` that differ from the source's shard."""
    if not names:
        return []
    tp = checkpoint.mapping.tp_size
    found, source_shapes = [], source.shapes
    for rank in checkpoint.plan.ranks:
        for planned in rank.tensors:
            if not names.intersection(planned.sources):
                continue
            shapes = tuple(source_shapes.get(s) for s in planned.sources)
            if shapes != planned.source_shapes:
                continue  # the source cannot make this tensor: already reported as missing or misshapen
            sources = to_stored(planned.ops, [source.load(s) for s in planned.sources], planned.torch_dtype)
            expected = planned.shard.forward(sources, tp, planned.tp_rank)
            actual = checkpoint.load(rank.rank, planned.name)
            if expected.dtype != actual.dtype or expected.shape != actual.shape:
                continue  # structural faults are reassembly violations
            index = first_difference(expected, actual)
            if index is not None:
                found.append(RankDifference(rank.rank, planned.name, planned.sources, max_abs_diff(expected, actual), index))
    return found
