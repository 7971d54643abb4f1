"""The dtype's cost to the model itself, and a checkpoint's cost judged against it and against a user's limits."""

from __future__ import annotations

import pytest
import torch

from shardproof.converter.errors import ShardproofError
from shardproof.verify.dtype_cost import COST_FLOOR, OwnCost, judge_cost, own_cost
from shardproof.verify.thresholds import UserLimits
from shardproof.verify.forward import BatchOptions, model_logits
from shardproof.verify.metrics import logit_metrics
from shardproof.verify.tiny_models import build_tiny_model

CPU = torch.device("cpu")


def perturbed(logits: torch.Tensor, size: float, seed: int = 1) -> torch.Tensor:
    return logits + size * torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    return torch.randn(2, 32, 200, generator=torch.Generator().manual_seed(0)) * 3


def cost(reference: torch.Tensor, size: float) -> OwnCost:
    return OwnCost("bfloat16", logit_metrics(reference, perturbed(reference, size), dtype="bfloat16"))


def test_own_cost_is_hf_in_the_dtype_against_hf_float32(tmp_path):
    model = build_tiny_model(tmp_path / "llama", "LlamaForCausalLM", seed=0)
    ids = BatchOptions(num_sequences=2, seq_len=32).input_ids(97)
    f32 = model_logits(model, torch.float32, CPU, ids)
    own = own_cost(model, "bfloat16", ids, CPU)
    assert own.dtype == own.metrics.noise_dtype == "bfloat16"
    assert own.metrics == logit_metrics(f32, model_logits(model, torch.bfloat16, CPU, ids), dtype="bfloat16")
    assert own.metrics.kl_mean > 0
    assert own_cost(model, "bfloat16", ids, CPU, reference=f32) == own  # the float32 run handed over
    free = own_cost(model, "float32", ids, CPU).metrics
    assert (free.kl_mean, free.max_abs_diff, free.decisive_top1_agreement) == (0, 0, 1)
    with pytest.raises(ShardproofError, match="int8"):
        own_cost(model, "int8", ids, CPU)


def test_a_checkpoint_as_costly_as_the_model_itself_passes(reference):
    own = cost(reference, 0.05)
    same = logit_metrics(reference, perturbed(reference, 0.05, seed=2), dtype="bfloat16")
    checks = judge_cost(same, own, factor=2)
    assert all(c.passed for c in checks.values()), checks
    assert set(checks) == {"kl_mean", "kl_max", "cosine_distance_max", "decisive_top1_disagreement", "nonfinite"}
    assert "2 x HF bfloat16's own" in str(checks["kl_mean"])


def test_a_checkpoint_costing_more_than_the_factor_fails(reference):
    own = cost(reference, 0.05)
    worse = logit_metrics(reference, perturbed(reference, 0.5), dtype="bfloat16")  # 10x the noise: ~100x the KL
    assert not judge_cost(worse, own, factor=10)["kl_mean"].passed
    assert not judge_cost(worse, own, factor=10)["cosine_distance_max"].passed
    assert judge_cost(worse, own, factor=1000)["kl_mean"].passed


def test_a_free_dtype_still_admits_float32_summation_noise(reference):
    own = OwnCost("float32", logit_metrics(reference, reference.clone(), dtype="float32"))
    reordered = logit_metrics(reference, perturbed(reference, 1e-6), dtype="float32")
    checks = judge_cost(reordered, own, factor=3)
    assert all(c.passed for c in checks.values()), checks
    assert checks["kl_mean"].threshold == COST_FLOOR.kl_mean and "float32's limit" in checks["kl_mean"].basis
    assert not judge_cost(logit_metrics(reference, perturbed(reference, 0.1)), own, factor=3)["kl_mean"].passed


def test_nonfinite_logits_fail_whatever_the_model_itself_does(reference):
    broken = perturbed(reference, 0.05)
    broken[0, 3, 7] = float("inf")
    own = OwnCost("float16", logit_metrics(reference, broken, dtype="float16"))
    assert not judge_cost(own.metrics, own, factor=1)["nonfinite"].passed


@pytest.mark.parametrize("factor", [0.5, float("nan"), float("inf")])
def test_a_factor_below_one_is_bad_input(reference, factor):
    with pytest.raises(ShardproofError, match="cost factor"):
        judge_cost(cost(reference, 0.05).metrics, cost(reference, 0.05), factor)


def test_user_limits_judge_only_what_is_given(reference):
    metrics = cost(reference, 0.05).metrics
    assert UserLimits().checks(metrics) == {}
    checks = UserLimits(max_kl=metrics.kl_mean / 2, min_top1=0.5).checks(metrics)
    assert set(checks) == {"kl_mean", "decisive_top1_agreement"}
    assert not checks["kl_mean"].passed and checks["decisive_top1_agreement"].passed
    assert UserLimits(min_cosine=metrics.cosine_min, max_kl_max=metrics.kl_max).checks(metrics)["cosine_min"].passed


@pytest.mark.parametrize("limits, option", [({"max_kl": -1.0}, "--max-kl "), ({"min_top1": 1.5}, "--min-top1"),
                                            ({"min_cosine": 2.0}, "--min-cosine"), ({"max_kl_max": -0.1}, "--max-kl-max")])
def test_a_user_limit_out_of_range_is_bad_input(limits, option):
    with pytest.raises(ShardproofError, match=option):
        UserLimits(**limits)
