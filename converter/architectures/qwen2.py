"""Qwen2ForCausalLM (TensorRT-LLM models/qwen/convert.py): Llama names, q/k/v always biased, o_proj never."""

from __future__ import annotations

from ..architecture import Architecture, register
from . import llama

QWEN2 = register(
    Architecture(
        name="Qwen2ForCausalLM",
        model_type="qwen2",
        rules=llama.RULES,
        source_shapes=llama.source_shapes,
        skips=llama.SKIPS,
        dims_from_hf=lambda hf: llama.dims_from_hf(hf, qkv_bias=True, dense_bias=False),
        trt_fields=lambda hf, d: {**llama.trt_fields(hf, d), "qwen_type": "qwen2"},
        dims_from_trt=lambda cfg: llama.dims_from_trt(cfg, dense_bias=False),
        hf_config=lambda cfg: {**llama.hf_config(cfg, "qwen2"), "use_sliding_window": False},
        forward="qwen2",
    )
)
