"""MistralForCausalLM: TensorRT-LLM converts it with the Llama code path and tables."""

from __future__ import annotations

from ..architecture import Architecture, register
from . import llama

MISTRAL = register(
    Architecture(
        name="MistralForCausalLM",
        model_type="mistral",
        rules=llama.RULES,
        source_shapes=llama.source_shapes,
        skips=llama.SKIPS,
        # Mistral's attention has no bias switch: q/k/v/o are bias-free.
        dims_from_hf=lambda hf: llama.dims_from_hf(hf, qkv_bias=False, dense_bias=False),
        trt_fields=llama.trt_fields,
        dims_from_trt=llama.dims_from_trt,
        hf_config=lambda cfg: {**llama.hf_config(cfg, "mistral"), "sliding_window": None},
        forward="llama",
    )
)
