"""Metric limits and the one place that turns logit metrics into checks against them, for both modes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .metrics import LogitMetrics


@dataclass(frozen=True)
class Thresholds:
    """Limits on the float32 model vs the checkpoint dtype's model; docs/verification.md says where they come from."""

    kl_mean: float
    decisive_top1_agreement: float  # top-1 agreement where the reference is not a near-tie (verify/metrics.py)
    cosine_min: float


PRECISION_THRESHOLDS: dict[str, Thresholds] = {
    "float32": Thresholds(kl_mean=1e-6, decisive_top1_agreement=0.99, cosine_min=0.99999),
    "float16": Thresholds(kl_mean=1e-3, decisive_top1_agreement=0.90, cosine_min=0.999),
    "bfloat16": Thresholds(kl_mean=3e-2, decisive_top1_agreement=0.80, cosine_min=0.95),
}


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


def precision_checks(metrics: LogitMetrics, dtype: str) -> dict[str, Check]:
    """`metrics` (float32 reference vs `dtype` candidate) judged by PRECISION_THRESHOLDS[dtype], by metric.

    Top-1 agreement is judged on the decisive positions only: an argmax within the dtype's rounding noise of its
    runner-up may flip in a correct checkpoint. Near-ties are those of `metrics.noise_dtype`; metrics measured
    with a finer dtype's noise (logits handed over as float32) count more positions as decisive, never fewer.
    """
    t = PRECISION_THRESHOLDS[dtype]
    return checks_by_metric(
        Check("kl_mean", metrics.kl_mean, "<=", t.kl_mean),
        Check("decisive_top1_agreement", metrics.decisive_top1_agreement, ">=", t.decisive_top1_agreement),
        Check("cosine_min", metrics.cosine_min, ">=", t.cosine_min),
        Check("nonfinite", metrics.nonfinite, "==", 0),
    )
