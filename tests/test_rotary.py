"""The runtime's rotary tables against transformers' own rotary module, bit for bit, for every scaling type,
on both sides of each type's switch (original_max_position_embeddings, max_position_embeddings)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from shardproof.verify.runtime.blocks import rotary_cos_sin
from shardproof.verify.runtime.config import RuntimeConfig

HEAD_DIM = 16
SCALINGS = {
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 3.0},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 16, "beta_slow": 2},
    "longrope": {"short_factor": [1.0, 1.02, 1.05, 1.1, 1.3, 1.8, 2.0, 2.8],
                 "long_factor": [1.1, 1.5, 3.0, 9.0, 15.0, 38.0, 57.0, 64.0], "original_max_position_embeddings": 16},
}
MAX_POSITIONS = 32


def _runtime_config(rope_type: str | None) -> RuntimeConfig:
    scaling = None if rope_type is None else {"rope_type": rope_type, **SCALINGS[rope_type]}
    return RuntimeConfig(
        architecture="LlamaForCausalLM", forward="llama", dtype=torch.float32, hidden_act="silu", vocab_size=8,
        hidden_size=4 * HEAD_DIM, num_layers=1, num_heads=4, num_kv_heads=4, head_size=HEAD_DIM,
        intermediate_size=8, norm_epsilon=1e-6, rotary_base=10000.0, rotary_scaling=scaling, attn_bias=False,
        mlp_bias=False, qk_layernorm=False, use_parallel_embedding=False, embedding_sharding_dim=0,
        share_embedding_table=False, tp_size=1, pp_size=1, max_position_embeddings=MAX_POSITIONS,
    )


def _hf_cos_sin(rope_type: str, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    config = LlamaConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, max_position_embeddings=MAX_POSITIONS,
                         rope_parameters={"rope_type": rope_type, "rope_theta": 10000.0, **SCALINGS[rope_type]})
    rotary = LlamaRotaryEmbedding(config)
    positions = torch.arange(seq_len)[None]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    return cos[0], sin[0]


@pytest.mark.parametrize("seq_len", [12, 48], ids=["short", "long"])
@pytest.mark.parametrize("rope_type", list(SCALINGS))
def test_rotary_tables_equal_transformers(rope_type: str, seq_len: int) -> None:
    cos, sin = rotary_cos_sin(_runtime_config(rope_type), seq_len, "cpu")
    hf_cos, hf_sin = _hf_cos_sin(rope_type, seq_len)
    assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)


@pytest.mark.parametrize("rope_type", list(SCALINGS))
def test_every_scaling_changes_the_long_range(rope_type: str) -> None:
    """Past the switch, each scaling's table differs from unscaled rope (dynamic and longrope only there)."""
    cos, _ = rotary_cos_sin(_runtime_config(rope_type), 48, "cpu")
    plain, _ = rotary_cos_sin(_runtime_config(None), 48, "cpu")
    assert not torch.allclose(cos, plain, atol=1e-3)


def test_longrope_switches_factors_past_the_original_length() -> None:
    """The same positions get the short factors in a 16-token forward and the long ones in a 17-token one."""
    cfg = _runtime_config("longrope")
    short, _ = rotary_cos_sin(cfg, 16, "cpu")
    long, _ = rotary_cos_sin(cfg, 17, "cpu")
    assert not torch.allclose(short, long[:16], atol=1e-3)


# Every rotary variant through convert and sharded verify, on every card: in float32 at a length that crosses
# each variant's switch (dynamic: max_position_embeddings, longrope: original_max_position_embeddings).
MAX_POS, ORIGINAL, CROSSING = 64, 32, 80


def _variants(half: int) -> dict[str, dict]:
    return {
        "linear": {"factor": 2.0},
        "dynamic": {"factor": 3.0},
        "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": ORIGINAL},
        "yarn": {"factor": 2.0, "original_max_position_embeddings": ORIGINAL, "beta_fast": 16, "beta_slow": 2},
        "longrope": {"short_factor": [1.0 + 0.1 * i for i in range(half)],
                     "long_factor": [1.5 + 4.0 * i for i in range(half)], "original_max_position_embeddings": ORIGINAL},
    }


def _sharded_outcome(tmp_path, card, rope_type: str, **extra) -> str:
    """'passed', 'not run: <reason>' or 'not accepted' (transformers or convert refuses the variant); a failed
    check fails the test."""
    import inspect

    import transformers
    from huggingface_hub.errors import StrictDataclassError

    from shardproof.converter.api import convert
    from shardproof.converter.errors import CheckNotRun, ShardproofError
    from shardproof.verify.forward import BatchOptions
    from shardproof.verify.sharded_check import sharded_check
    from shardproof.verify.tiny_models import build_tiny_model, tiny_sizes

    params = {"rope_type": rope_type, "rope_theta": 10000.0,
              **_variants(tiny_sizes(card.name)["head_dim"] // 2)[rope_type], **extra}
    overrides = {"rope_parameters": params, "max_position_embeddings": MAX_POS}
    config_class = getattr(transformers, card.tests.config_class)
    if "original_max_position_embeddings" in inspect.signature(config_class.__init__).parameters:
        overrides["original_max_position_embeddings"] = ORIGINAL  # the class reads it at the top level too
    model, ckpt = tmp_path / f"{card.name}-{rope_type}", tmp_path / f"{card.name}-{rope_type}-ckpt"
    try:
        build_tiny_model(model, card.name, seed=1, **overrides)
    except (ValueError, TypeError, KeyError, StrictDataclassError):  # transformers refuses the variant
        return "not accepted"
    try:
        convert(model, ckpt, dtype="float32", tp_size=2)
    except ShardproofError:
        return "not accepted"
    try:
        report = sharded_check(model, ckpt, BatchOptions(num_sequences=1, seq_len=CROSSING, device="cpu"))
    except CheckNotRun as e:
        return f"not run: {e}"
    assert report.passed, f"{card.name} {rope_type}: {report.failures}"
    return "passed"


@pytest.mark.parametrize("rope_type", list(_variants(8)))
def test_every_variant_convert_accepts_passes_sharded_verify_or_is_not_run(tmp_path, rope_type: str) -> None:
    """On every card, a variant convert accepts passes sharded verify against HF's float32 forward past its
    switch, or is reported as not run; and at least one card's checkpoint executes it."""
    from shardproof.converter.card import cards

    outcomes = {card.name: _sharded_outcome(tmp_path, card, rope_type) for card in cards()}
    assert "passed" in outcomes.values(), outcomes


def test_a_yarn_attention_factor_tensorrt_llm_ignores_is_not_run(tmp_path) -> None:
    """TensorRT-LLM's yarn takes its attention factor from mscale / mscale_all_dim; an explicit attention_factor
    that differs would not be executed, so the check does not run (and says why) on every card that converts yarn."""
    from shardproof.converter.card import cards

    outcomes = [_sharded_outcome(tmp_path, card, "yarn", attention_factor=1.5) for card in cards()]
    executed = [o for o in outcomes if o != "not accepted"]
    assert executed and all(o.startswith("not run:") and "attention factor" in o for o in executed), outcomes
