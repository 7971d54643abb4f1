"""How far one set of logits is from another: abs diffs, cosine, KL divergence, top-1 agreement, bit identity."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_INT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaN equals the same NaN, -0.0 differs from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = _INT_VIEWS[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def first_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[int, ...] | None:
    """Index of the first element whose bits differ (row-major order), or None when identical."""
    view = _INT_VIEWS[a.element_size()]
    differs = (a.contiguous().view(view) != b.contiguous().view(view)).reshape(-1)
    if not differs.any():
        return None
    flat = int(torch.argmax(differs.to(torch.uint8)))
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))


def json_float(value: float) -> float | str:
    """`value` as JSON allows it: a non-finite float becomes its string ("nan", "inf", "-inf")."""
    return value if not isinstance(value, float) or math.isfinite(value) else str(value)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| in float32 (NaN when either holds a NaN, inf when one overflowed)."""
    diff = (a.float() - b.float()).abs()
    return float(diff.max()) if diff.numel() else 0.0


@dataclass(frozen=True)
class LogitMetrics:
    """Distance of candidate logits from reference logits over every (sequence, position).

    KL is KL(reference || candidate) of the softmax distributions, in nats; cosine is per position.
    `nonfinite` counts candidate logits that are inf or NaN where the reference's are finite.
    """

    positions: int
    max_abs_diff: float
    mean_abs_diff: float
    cosine_min: float
    cosine_mean: float
    kl_mean: float
    kl_max: float
    top1_agreement: float
    nonfinite: int


def logit_metrics(reference: torch.Tensor, candidate: torch.Tensor, chunk: int = 4096) -> LogitMetrics:
    """Compare logits of shape [..., vocab] position by position, in float64, `chunk` positions at a time."""
    if reference.shape != candidate.shape:
        raise ValueError(f"logits shapes differ: {list(reference.shape)} vs {list(candidate.shape)}")
    vocab = reference.shape[-1]
    ref_all, cand_all = reference.reshape(-1, vocab), candidate.reshape(-1, vocab)
    positions = ref_all.shape[0]
    if not positions:
        raise ValueError("no logits to compare")
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("diff_max", "diff_sum", "cos", "kl", "agree", "nonfinite")}
    for start in range(0, positions, chunk):
        ref = ref_all[start : start + chunk].double()
        cand = cand_all[start : start + chunk].double()
        diff = (ref - cand).abs()
        log_p, log_q = torch.log_softmax(ref, dim=-1), torch.log_softmax(cand, dim=-1)
        parts["diff_max"].append(diff.max(dim=-1).values)
        parts["diff_sum"].append(diff.sum(dim=-1))
        parts["cos"].append(torch.nn.functional.cosine_similarity(ref, cand, dim=-1))
        parts["kl"].append((log_p.exp() * (log_p - log_q)).sum(dim=-1))
        parts["agree"].append(ref.argmax(dim=-1) == cand.argmax(dim=-1))
        parts["nonfinite"].append((~torch.isfinite(cand) & torch.isfinite(ref)).sum(dim=-1))
    # torch reductions propagate NaN (Python's max() would drop it), so a NaN anywhere shows in the result.
    t = {k: torch.cat(v) for k, v in parts.items()}
    return LogitMetrics(
        positions=positions,
        max_abs_diff=float(t["diff_max"].max()),
        mean_abs_diff=float(t["diff_sum"].sum()) / (positions * vocab),
        cosine_min=float(t["cos"].min()),
        cosine_mean=float(t["cos"].mean()),
        kl_mean=float(t["kl"].mean()),
        kl_max=float(t["kl"].max()),
        top1_agreement=float(t["agree"].double().mean()),
        nonfinite=int(t["nonfinite"].sum()),
    )
