"""What a reduced dtype costs the model itself, and a checkpoint's cost judged against it.

A fixed limit cannot tell a model that is fragile in bfloat16 from a checkpoint that is wrong: a trained
model's own bfloat16 forward may already miss a limit a random one meets. The model's own cost is HF's float32
forward against HF's forward of the same model loaded by transformers in the reduced dtype, on the same
tokens (`own_cost`). A checkpoint's cost (its logits in that dtype against HF float32) may exceed the own cost
by at most COST_FACTOR (`judge_cost`); a user's stated limits (`thresholds.UserLimits`) fail the run only when given.
docs/verification.md gives the measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from shardproof.converter.dtypes import TORCH_DTYPES
from shardproof.converter.errors import ShardproofError

from .forward import logits_pass
from .lockstep import run_passes
from .metrics import LogitMetrics, logit_metrics
from .streaming import Progress, ResidentParameters
from .thresholds import FLOAT32_LIMITS, Check, checks_by_metric

# Differences within float32's own limits never fail a relative check: a model whose own cost is zero (float32)
# still leaves a checkpoint run with another summation order (tensor-parallel partial sums) these.
COST_FLOOR = FLOAT32_LIMITS
# The sharded runtime's cost over the model's own, on correct conversions: up to 2.9 x (SmolLM2 float16 tp 3 pp 2, KL
# at the worst of 256 positions), 2.3 x on the tiny models of every card, about 1 x at 8B width (docs/verification.md),
# so 30 x leaves a correct checkpoint a 10 x margin; anything beyond is "far beyond what the dtype alone explains".
# No mutant of the self-test is caught by this check alone: conversion faults are the float32 comparison's.
COST_FACTOR = 30.0


@dataclass(frozen=True)
class OwnCost:
    """HF float32 (reference) against HF in `dtype` (candidate), on the same tokens."""

    dtype: str
    metrics: LogitMetrics

    @classmethod
    def measured(cls, dtype: str, reference: torch.Tensor, candidate: torch.Tensor,
                 device: torch.device | None = None) -> OwnCost:
        """From HF float32's logits (`reference`) and HF's in `dtype` (`candidate`) on the same tokens, compared on
        `device` (`logit_metrics`)."""
        return cls(dtype, logit_metrics(reference, candidate, dtype=dtype, device=device))


def own_cost(model_dir: Path | str, dtype: str, input_ids: torch.Tensor, device: torch.device,
             reference: torch.Tensor | None = None, resident: ResidentParameters | None = None,
             progress: Progress | None = None) -> OwnCost:
    """The model's own cost of `dtype`: HF's forward of `model_dir` loaded in `dtype` against its float32 forward
    on `input_ids`. `reference` is that float32 forward's logits when the caller has them already (it must have
    run the same model on the same tokens; otherwise both run in lock step, sharing each read,
    `verify/lockstep.py`); float32 costs nothing and runs the model only for the reference."""
    if dtype not in TORCH_DTYPES:
        raise ShardproofError(f"dtype {dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
    passes = [] if reference is not None else [logits_pass(torch.float32, device, input_ids)]
    if dtype != "float32":
        passes.append(logits_pass(TORCH_DTYPES[dtype], device, input_ids))
    logits = run_passes(model_dir, passes, device, resident, progress) if passes else []
    if reference is None:
        reference = logits.pop(0)
    return OwnCost.measured(dtype, reference, logits[0] if logits else reference, device)


def judge_cost(checkpoint: LogitMetrics, own: OwnCost, factor: float) -> dict[str, Check]:
    """`checkpoint` (HF float32 vs the checkpoint in `own.dtype`, on the same tokens) against `factor` x the
    model's own cost, by metric: KL mean and max, cosine distance (1 - cosine) at the worst position, and
    disagreement on decisive positions (1 - decisive top-1 agreement); each limit is at least COST_FLOOR's.
    Non-finite logits fail whatever the model's own run gives."""
    if not (math.isfinite(factor) and factor >= 1):
        raise ShardproofError(f"cost factor {factor}: must be a finite number >= 1")
    m = own.metrics
    floor = COST_FLOOR

    def relative(metric: str, value: float, own_value: float, floor_value: float) -> Check:
        basis = f"{factor:g} x HF {own.dtype}'s own {own_value:.3g}"
        if factor * own_value < floor_value:
            basis += f", raised to float32's limit {floor_value:.3g}"
        return Check(metric, value, "<=", max(factor * own_value, floor_value), basis)

    return checks_by_metric(
        relative("kl_mean", checkpoint.kl_mean, m.kl_mean, floor.kl_mean),
        relative("kl_max", checkpoint.kl_max, m.kl_max, floor.kl_mean),
        relative("cosine_distance_max", 1 - checkpoint.cosine_min, 1 - m.cosine_min, 1 - floor.cosine_min),
        relative("decisive_top1_disagreement", 1 - checkpoint.decisive_top1_agreement,
                 1 - m.decisive_top1_agreement, 1 - floor.decisive_top1_agreement),
        Check("nonfinite", checkpoint.nonfinite, "==", 0),
    )
