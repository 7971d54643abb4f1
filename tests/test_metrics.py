"""Logit metrics: near-ties measured against the dtype's rounding, decisive top-1 agreement, the worst positions."""

from __future__ import annotations

import json
import math

import pytest
import torch

from shardproof.verify.metrics import NOISE_MULTIPLE, logit_metrics, unit_roundoff
from shardproof.verify.serialize import to_json
from shardproof.verify.thresholds import UserLimits

VOCAB = 64


def with_gaps(gaps: list[list[float]], seed: int = 0) -> torch.Tensor:
    """Logits [sequences, positions, VOCAB]: N(0, 1) values, token 0 leading token 1 by `gaps[s][p]`, both
    above every other token."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(gaps), len(gaps[0]), VOCAB, generator=generator)
    top = logits.amax(dim=-1) + 1.0
    logits[..., 1] = top
    logits[..., 0] = top + torch.tensor(gaps)
    return logits


def swap_top_two(logits: torch.Tensor, *at: tuple[int, int]) -> torch.Tensor:
    """A copy whose tokens 0 and 1 trade places at each (sequence, position): the argmax flips there."""
    out = logits.clone()
    for s, p in at:
        out[s, p, [0, 1]] = out[s, p, [1, 0]]
    return out


def test_unit_roundoff_is_half_the_epsilon():
    assert [unit_roundoff(d) for d in ("float32", "float16", "bfloat16")] == [2.0**-24, 2.0**-11, 2.0**-8]


def test_a_flip_at_a_near_tie_is_not_a_disagreement():
    # bfloat16's near-tie bound here is NOISE_MULTIPLE * 2^-8 * std(logits) ~ 0.3: a gap of 1e-3 is a tie, 3 is not.
    reference = with_gaps([[1e-3, 3.0, 3.0, 3.0], [3.0, 1e-3, 3.0, 3.0]])
    candidate = swap_top_two(reference, (0, 0), (1, 1))
    m = logit_metrics(reference, candidate, dtype="bfloat16")
    assert m.top1_agreement == 6 / 8 and m.decisive_top1_agreement == 1.0 and m.near_ties == 2
    assert m.worst_flip is None
    assert UserLimits(min_top1=0.8).checks(m)["decisive_top1_agreement"].passed


def test_a_flip_at_a_decisive_position_is_reported_with_its_tokens_and_gap():
    reference = with_gaps([[1e-3, 3.0, 3.0, 3.0], [3.0, 1e-3, 5.0, 3.0]])
    candidate = swap_top_two(reference, (0, 0), (0, 1), (1, 2))
    m = logit_metrics(reference, candidate, dtype="bfloat16")
    assert m.near_ties == 2 and m.decisive_top1_agreement == pytest.approx(4 / 6)
    flip = m.worst_flip  # of the two decisive flips, the one with the larger reference gap
    assert (flip.sequence, flip.position, flip.reference_token, flip.candidate_token) == (1, 2, 0, 1)
    assert flip.reference_gap == pytest.approx(5.0) and 0 < flip.noise < 1.0
    assert not UserLimits(min_top1=0.8).checks(m)["decisive_top1_agreement"].passed  # 0.67 < 0.8


def test_the_near_tie_bound_scales_with_the_dtype_rounding():
    # A gap of 0.1 is decisive at float16's bound (~0.03) and float32's, a near-tie at bfloat16's (~0.25).
    reference = with_gaps([[0.1, 3.0]])
    candidate = swap_top_two(reference, (0, 0))
    by_dtype = {d: logit_metrics(reference, candidate, dtype=d) for d in ("float32", "float16", "bfloat16")}
    assert {d: m.near_ties for d, m in by_dtype.items()} == {"float32": 0, "float16": 0, "bfloat16": 1}
    assert by_dtype["float16"].decisive_top1_agreement == 0.5 and by_dtype["bfloat16"].decisive_top1_agreement == 1.0
    std = reference[0, 0].double().std(correction=0)
    assert by_dtype["float16"].worst_flip.noise == pytest.approx(float(NOISE_MULTIPLE * 2.0**-11 * std))


def test_the_noise_dtype_is_the_coarser_tensor_dtype_unless_given():
    reference = with_gaps([[3.0, 3.0]])
    assert logit_metrics(reference, reference.clone()).noise_dtype == "float32"
    assert logit_metrics(reference, reference.bfloat16()).noise_dtype == "bfloat16"
    assert logit_metrics(reference.half(), reference).noise_dtype == "float16"
    assert logit_metrics(reference, reference.clone(), dtype="bfloat16").noise_dtype == "bfloat16"


def test_the_worst_cosine_names_its_position():
    reference = with_gaps([[3.0, 3.0, 3.0], [3.0, 3.0, 3.0]])
    candidate = reference.clone()
    candidate[1, 2] = torch.flip(candidate[1, 2], dims=[0])  # one position scrambled, its argmax changed
    m = logit_metrics(reference, candidate, dtype="float16")
    w = m.worst_cosine
    assert (w.sequence, w.position, w.reference_token) == (1, 2, 0) and w.candidate_token != 0
    assert w.cosine == m.cosine_min < 0.5 and w.kl == m.kl_max
    assert m.worst_flip == w  # the only flip, and decisive
    assert "sequence 1 position 2: token 0 -> " in str(w)


def test_a_nan_position_is_the_worst_and_the_metrics_serialize():
    reference = with_gaps([[3.0, 3.0, 3.0]])
    candidate = reference.clone()
    candidate[0, 1, 5] = float("nan")
    m = logit_metrics(reference, candidate)
    assert m.nonfinite == 1 and math.isnan(m.cosine_min) and m.worst_cosine.position == 1
    data = json.loads(json.dumps(to_json(m)))
    assert data["cosine_min"] == "nan" and data["worst_cosine"]["position"] == 1
    assert data["worst_flip"]["candidate_token"] == 5  # argmax takes the NaN: a flip
    assert data["near_ties"] == 0 and data["noise_dtype"] == "float32"
    assert not UserLimits(min_cosine=0.99999).checks(m)["cosine_min"].passed  # NaN fails every limit


def test_a_top1_limit_judges_decisive_agreement_not_raw_top1():
    checks = UserLimits(min_top1=0.9).checks(logit_metrics(with_gaps([[3.0]]), with_gaps([[3.0]]), dtype="float16"))
    assert set(checks) == {"decisive_top1_agreement"} and checks["decisive_top1_agreement"].threshold == 0.9
