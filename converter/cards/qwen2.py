"""Qwen2ForCausalLM (TensorRT-LLM `models/qwen/convert.py`): Llama names, q/k/v always biased, o_proj never
(TensorRT-LLM's Qwen attention is built with dense_bias=False)."""

from __future__ import annotations

from ..card import register
from ..hf_fields import revised, size
from . import llama

QWEN2 = register(llama.decoder_card(
    "Qwen2ForCausalLM", "qwen2", "Qwen2Config",
    forward="qwen2",
    dims_from_hf=lambda hf: llama.dims_from_hf(hf, qkv_bias=True, dense_bias=False),
    dims_from_trt=lambda cfg: llama.dims_from_trt(cfg, dense_bias=False),
    extra_trt={"qwen_type": "qwen2"},
    extra_hf={"use_sliding_window": False},
    hf_fields=revised(llama.HF_FIELDS, ("attention_bias", "mlp_bias"), vocab_size=size(151936),
                      intermediate_size=size(22016), max_position_embeddings=size(32768),
                      num_key_value_heads=size(32, optional=True)),
    hf_ignored={**llama.SLIDING_WINDOW_IGNORED,
                "attention_bias": "Qwen2's attention hard-wires a q/k/v bias and no o_proj bias",
                "mlp_bias": "Qwen2's MLP has no bias"},
))
