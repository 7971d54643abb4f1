"""Tensor-by-tensor comparison of the tensors the rank files give back with the source cast to the checkpoint's dtype.

Conversion is data movement plus one cast (and, for a tensor made through an op that rounds, such as a norm stored as
1 + weight, that op's declared rounding); the source goes through the same here, so every tensor must be bit-identical: there
is no tolerance. A tensor that differs is also traced back to the rank files that hold
it, by re-running its shard on the source and comparing with what each rank stores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from shardproof.converter.checkpoint import TRTCheckpoint, Violation
from shardproof.converter.plan import holds
from shardproof.converter.reassemble import invert_group, rebuild
from shardproof.converter.source import Source
from shardproof.converter.transforms import to_stored

from .metrics import first_difference, max_abs_diff
from .streaming import Progress


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


def compare_weights(
    source: Source,
    checkpoint: TRTCheckpoint,
    violations: list[Violation],
    progress: Progress | None = None,
    device: torch.device = torch.device("cpu"),
) -> WeightComparison:
    """Rebuild every source tensor from the rank files (`rebuild`: what its inverses find is appended to
    `violations`) and compare it with the source's, cast to the checkpoint's dtype: one pass over the rank files and
    the source, one tensor pair in memory at a time; `progress` gets each source tensor's bytes once compared.

    The expected value is `Plan.reassembled_value`: the cast, through its ops' round trip where one rounds. Source
    tensors the checkpoint's architecture skips (rotary frequencies, a tied lm_head) are listed, not compared;
    whether a skip applies is decided from the source's own config. Differing tensors are traced to the rank files
    (see `locate_in_ranks`). On a GPU `device` the pair is read and compared there; a pair that differs there is
    compared again on the host, whose cast is the one conversion used (a device's cast may spell a NaN otherwise),
    so the device only speeds up the common case and never decides a difference.
    """
    plan, card = checkpoint.plan, checkpoint.card
    result = WeightComparison(checkpoint.layout.dtype, [])
    rounded = set(plan.rounded_sources())
    for name, actual, group in rebuild(checkpoint, violations, device if device.type != "cpu" else None):
        if name not in source.shapes:
            result.extra.append(name)
            continue
        shape = tuple(source.shapes[name])
        here = None if name in rounded or device.type == "cpu" else device
        expected = plan.reassembled_value(name, source.load(name, here)).to(actual.device)
        if tuple(actual.shape) != shape or actual.dtype != expected.dtype:
            problem = f"{actual.dtype} {list(actual.shape)} in the checkpoint, {expected.dtype} {list(shape)} expected"
            result.tensors.append(TensorComparison(name, shape, False, math.inf, None, problem))
        else:
            index = first_difference(expected, actual)
            if index is not None and actual.device.type != "cpu":
                sources, _, _ = invert_group(checkpoint, group)
                actual = sources[group[0].sources.index(name)]
                expected = plan.reassembled_value(name, source.load(name))
                index = first_difference(expected, actual)
            diff = 0.0 if index is None else max_abs_diff(expected, actual)
            result.tensors.append(TensorComparison(name, shape, index is None, diff, index))
        del expected, actual
        if progress:
            progress(source.nbytes(name))
    compared = {t.name for t in result.tensors}
    source_dims = card.config.dims_from_hf(source.hf_config)
    for name, shape in source.shapes.items():
        if name in compared:
            continue
        skip = next((s for s in card.skips if holds(s.when, source_dims, checkpoint.layout) and s.matches(name)), None)
        if skip is not None:
            result.skipped[name] = skip.reason
        else:
            result.tensors.append(TensorComparison(name, tuple(shape), False, math.inf, None, "missing from the checkpoint"))
    result.extra.sort()
    result.ranks = locate_in_ranks(source, checkpoint, {t.name for t in result.mismatches})
    return result


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
