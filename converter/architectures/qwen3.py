"""Qwen3ForCausalLM (TensorRT-LLM models/qwen/convert.py): per-head q/k RMSNorm, head_dim set on its own."""

from __future__ import annotations

from ..architecture import Architecture, register
from . import llama

QWEN3 = register(
    Architecture(
        name="Qwen3ForCausalLM",
        model_type="qwen3",
        rules=llama.RULES,
        source_shapes=llama.source_shapes,
        skips=llama.SKIPS,
        dims_from_hf=lambda hf: llama.dims_from_hf(hf, qk_norm=True),
        trt_fields=lambda hf, d: {**llama.trt_fields(hf, d), "qwen_type": "qwen3"},
        dims_from_trt=llama.dims_from_trt,
        hf_config=lambda cfg: {**llama.hf_config(cfg, "qwen3"), "use_sliding_window": False},
        forward="llama",
    )
)
