"""Qwen3ForCausalLM (TensorRT-LLM `models/qwen/convert.py`): per-head q/k RMSNorm, head_dim set on its own."""

from __future__ import annotations

from ..card import register
from ..hf_fields import revised, size
from . import llama

QWEN3 = register(llama.decoder_card(
    "Qwen3ForCausalLM", "qwen3", "Qwen3Config",
    dims_from_hf=lambda hf: llama.dims_from_hf(hf, qk_norm=True),
    extra_trt={"qwen_type": "qwen3"},
    extra_hf={"use_sliding_window": False},
    hf_fields=revised(llama.HF_FIELDS, ("mlp_bias",), vocab_size=size(151936), intermediate_size=size(22016),
                      max_position_embeddings=size(32768), num_key_value_heads=size(32, optional=True),
                      head_dim=size(128)),
    hf_ignored=llama.SLIDING_WINDOW_IGNORED,
    strategy=llama.with_switches(llama.model_strategy, attention_bias=True),
    selftest=dict(attention_bias=True),
))
