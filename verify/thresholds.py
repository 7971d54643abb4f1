"""Checks of logit metrics against limits: float32's own, and the ones a user states."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

from shardproof.converter.errors import ShardproofError

from .metrics import LogitMetrics


@dataclass(frozen=True)
class Thresholds:
    """Limits on a reference's logits against a candidate's, by metric."""

    kl_mean: float
    decisive_top1_agreement: float  # top-1 agreement where the reference is not a near-tie (verify/metrics.py)
    cosine_min: float


# What float32 itself leaves between two runs that differ only in summation order (tensor-parallel partial sums):
# no cost judged against the model's own is ever held below these (verify/dtype_cost.py).
FLOAT32_LIMITS = Thresholds(kl_mean=1e-6, decisive_top1_agreement=0.99, cosine_min=0.99999)


@dataclass(frozen=True)
class Check:
    """One metric against its threshold; NaN fails every comparison. `basis` says where a threshold that is not
    a fixed limit comes from (e.g. "3 x HF bfloat16's own 1e-3")."""

    JSON_PROPERTIES: ClassVar[tuple[str, ...]] = ("passed",)

    metric: str
    value: float
    op: str
    threshold: float
    basis: str = ""

    @property
    def passed(self) -> bool:
        if self.op == "<=":
            return self.value <= self.threshold
        if self.op == ">=":
            return self.value >= self.threshold
        return self.value == self.threshold

    def __str__(self) -> str:
        basis = f": {self.basis}" if self.basis else ""
        return f"{self.metric} {self.value:.3g} (must be {self.op} {self.threshold:.3g}{basis})"


def checks_by_metric(*checks: Check) -> dict[str, Check]:
    return {c.metric: c for c in checks}


@dataclass(frozen=True)
class UserLimits:
    """Limits a user states on the dtype's cost (HF float32 against the checkpoint in its dtype): `--max-kl` (KL
    mean), `--max-kl-max`, `--min-top1` (decisive top-1 agreement), `--min-cosine` (worst position). None: not
    judged. Values outside the metric's range are bad input."""

    max_kl: float | None = None
    max_kl_max: float | None = None
    min_top1: float | None = None
    min_cosine: float | None = None

    def __post_init__(self) -> None:
        ranges = {"max_kl": (0, math.inf), "max_kl_max": (0, math.inf), "min_top1": (0, 1), "min_cosine": (-1, 1)}
        for f in fields(self):
            value, (low, high) = getattr(self, f.name), ranges[f.name]
            if value is not None and not low <= value <= high:
                option = "--" + f.name.replace("_", "-")
                raise ShardproofError(f"{option} {value}: must be between {low} and {high}")

    def checks(self, metrics: LogitMetrics) -> dict[str, Check]:
        """One check per limit given, by metric."""
        given = [
            (self.max_kl, "kl_mean", metrics.kl_mean, "<="),
            (self.max_kl_max, "kl_max", metrics.kl_max, "<="),
            (self.min_top1, "decisive_top1_agreement", metrics.decisive_top1_agreement, ">="),
            (self.min_cosine, "cosine_min", metrics.cosine_min, ">="),
        ]
        return checks_by_metric(*(Check(metric, value, op, limit, "user limit")
                                  for limit, metric, value, op in given if limit is not None))
