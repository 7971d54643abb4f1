"""How far one set of logits is from another: abs diffs, cosine, KL divergence, top-1 agreement where the
reference is decisive (near-ties apart), the worst positions, bit identity."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from shardproof.converter.dtypes import TORCH_DTYPES, dtype_name

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


# Near-ties. A position is decisive when the reference's top-1 logit leads its runner-up by more than
# NOISE_MULTIPLE x u x (the spread of the reference's logits there): u is the unit roundoff of the dtype the
# candidate computes in (2^-8 bfloat16, 2^-11 float16, 2^-24 float32), the spread their standard deviation over
# the vocabulary. Rounding a model's weights and activations to that dtype moves its logits by about
# u x spread x a factor that grows with depth; docs/verification.md gives the measurements the multiple covers.
# Elsewhere the argmax may flip without anything being wrong, so top-1 agreement is judged on decisive positions.
NOISE_MULTIPLE = 64.0


def unit_roundoff(dtype: str) -> float:
    """Half the machine epsilon of a dtype named as TensorRT-LLM names it (float32, float16, bfloat16)."""
    return torch.finfo(TORCH_DTYPES[dtype]).eps / 2


def dtype_of(*logits: torch.Tensor) -> str:
    """The coarsest dtype name among the tensors (float32 unless one is float16 or bfloat16)."""
    names = {dtype_name(t.dtype) if t.dtype in TORCH_DTYPES.values() else "float32" for t in logits}
    return max(names, key=unit_roundoff)


@dataclass(frozen=True)
class Position:
    """One (sequence, position) of the logits: the tokens each side ranks first, the reference's lead of its
    top-1 over its top-2 logit (`reference_gap`), the near-tie bound there (`noise`), cosine and KL."""

    sequence: int
    position: int
    reference_token: int
    candidate_token: int
    reference_gap: float
    noise: float
    cosine: float
    kl: float

    def __str__(self) -> str:
        tokens = (f"token {self.reference_token} kept" if self.reference_token == self.candidate_token
                  else f"token {self.reference_token} -> {self.candidate_token}")
        return (f"sequence {self.sequence} position {self.position}: {tokens}, reference gap {self.reference_gap:.3g} "
                f"(noise {self.noise:.3g}), cosine {self.cosine:.6g}, KL {self.kl:.3g}")


@dataclass(frozen=True)
class LogitMetrics:
    """Distance of candidate logits from reference logits over every (sequence, position).

    KL is KL(reference || candidate) of the softmax distributions, in nats; cosine is per position.
    `nonfinite` counts candidate logits that are inf or NaN where the reference's are finite.
    `top1_agreement` is over every position; `decisive_top1_agreement` over the positions that are not near-ties
    of the reference at `noise_dtype`'s rounding (NOISE_MULTIPLE), 1.0 when there are none; `near_ties` counts
    the others. `worst_cosine` is the position of `cosine_min`; `worst_flip` the decisive position
    whose argmax changed with the largest reference gap (None when none changed).
    """

    positions: int
    max_abs_diff: float
    mean_abs_diff: float
    cosine_min: float
    cosine_mean: float
    kl_mean: float
    kl_max: float
    top1_agreement: float
    decisive_top1_agreement: float
    near_ties: int
    nonfinite: int
    noise_dtype: str
    worst_cosine: Position
    worst_flip: Position | None


_PARTS = ("diff_max", "diff_sum", "cos", "kl", "ref_top", "cand_top", "gap", "noise", "nonfinite")
# Logits compared per chunk of positions holding at most this many elements: each of the chunk's float64
# temporaries is 128 MiB, whatever the vocabulary (4096 positions of a 128k vocabulary made each 4 GiB: the
# largest part of a verification's host memory at 8B).
CHUNK_ELEMENTS = 1 << 24


def logit_metrics(reference: torch.Tensor, candidate: torch.Tensor, dtype: str | None = None,
                  device: torch.device | None = None) -> LogitMetrics:
    """Compare logits of shape [..., seq_len, vocab] position by position, in float64, a chunk of positions
    (`CHUNK_ELEMENTS`) at a time, each chunk moved to `device` (default: the reference's) to be compared there: a
    run's logits wait on the host, and an 8B model's 2 x 256 positions took 1.5 s per comparison on 16 cores,
    the largest cost after the reads (py-spy over `bench/verify_memory.py`'s verify child).

    `dtype` is what the candidate computed in, which sets the near-tie bound; None takes the coarser dtype of
    the two tensors (float32 for float32 tensors: pass it when reduced-precision logits come back as float32).
    """
    if reference.shape != candidate.shape:
        raise ValueError(f"logits shapes differ: {list(reference.shape)} vs {list(candidate.shape)}")
    noise_dtype = dtype or dtype_of(reference, candidate)
    roundoff = unit_roundoff(noise_dtype)
    vocab = reference.shape[-1]
    seq_len = reference.shape[-2] if reference.dim() > 1 else 1
    ref_all, cand_all = reference.reshape(-1, vocab), candidate.reshape(-1, vocab)
    positions = ref_all.shape[0]
    if not positions:
        raise ValueError("no logits to compare")
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in _PARTS}
    chunk = max(1, CHUNK_ELEMENTS // vocab)
    for start in range(0, positions, chunk):
        ref = ref_all[start : start + chunk].to(device).double()
        cand = cand_all[start : start + chunk].to(device).double()
        diff = (ref - cand).abs()
        log_p, log_q = torch.log_softmax(ref, dim=-1), torch.log_softmax(cand, dim=-1)
        top2 = ref.topk(min(2, vocab), dim=-1)
        parts["diff_max"].append(diff.max(dim=-1).values)
        parts["diff_sum"].append(diff.sum(dim=-1))
        parts["cos"].append(torch.nn.functional.cosine_similarity(ref, cand, dim=-1))
        parts["kl"].append((log_p.exp() * (log_p - log_q)).sum(dim=-1))
        parts["ref_top"].append(top2.indices[:, 0])
        parts["cand_top"].append(cand.argmax(dim=-1))
        parts["gap"].append(top2.values[:, 0] - top2.values[:, -1] if vocab > 1 else torch.full_like(ref[:, 0], math.inf))
        parts["noise"].append(NOISE_MULTIPLE * roundoff * ref.std(dim=-1, correction=0))
        parts["nonfinite"].append((~torch.isfinite(cand) & torch.isfinite(ref)).sum(dim=-1))
    # torch reductions propagate NaN (Python's max() would drop it), so a NaN anywhere shows in the result.
    t = {k: torch.cat(v) for k, v in parts.items()}
    agree = t["ref_top"] == t["cand_top"]
    decisive = t["gap"] > t["noise"]
    flips = decisive & ~agree

    def at(i: int) -> Position:
        return Position(i // seq_len, i % seq_len, int(t["ref_top"][i]), int(t["cand_top"][i]), float(t["gap"][i]),
                        float(t["noise"][i]), float(t["cos"][i]), float(t["kl"][i]))

    # A NaN cosine is the worst position there is (argmin over NaN-as--inf finds the first one).
    worst_cosine = int(t["cos"].nan_to_num(nan=-math.inf).argmin())
    worst_flip = int(torch.where(flips, t["gap"], -math.inf).argmax()) if flips.any() else None
    n_decisive = int(decisive.sum())
    return LogitMetrics(
        positions=positions,
        max_abs_diff=float(t["diff_max"].max()),
        mean_abs_diff=float(t["diff_sum"].sum()) / (positions * vocab),
        cosine_min=float(t["cos"].min()),
        cosine_mean=float(t["cos"].mean()),
        kl_mean=float(t["kl"].mean()),
        kl_max=float(t["kl"].max()),
        top1_agreement=float(agree.double().mean()),
        decisive_top1_agreement=float((decisive & agree).sum()) / n_decisive if n_decisive else 1.0,
        near_ties=positions - n_decisive,
        nonfinite=int(t["nonfinite"].sum()),
        noise_dtype=noise_dtype,
        worst_cosine=at(worst_cosine),
        worst_flip=None if worst_flip is None else at(worst_flip),
    )
