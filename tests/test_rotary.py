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
