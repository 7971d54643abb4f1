"""GemmaForCausalLM (TensorRT-LLM models/gemma/convert.py): Llama names, norms stored as 1 + weight.

HF's GemmaRMSNorm multiplies by (1 + weight) in float32; TensorRT-LLM's runtime norm multiplies by the stored
weight, so the converter stores `param + 1.0` computed in float32, then cast. The embedding is stored
unscaled (the runtime multiplies by sqrt(hidden_size)), and the lm_head is the tied embedding.
"""

from __future__ import annotations

import dataclasses

from ..architecture import Architecture, register
from ..format_ops import ADD_ONE
from . import llama

RULES = tuple(
    dataclasses.replace(rule, op=ADD_ONE) if rule.target.endswith(("layernorm.weight", "ln_f.weight")) else rule
    for rule in llama.RULES
)

GEMMA = register(
    Architecture(
        name="GemmaForCausalLM",
        model_type="gemma",
        rules=RULES,
        source_shapes=llama.source_shapes,
        skips=llama.SKIPS,
        dims_from_hf=llama.dims_from_hf,
        trt_fields=lambda hf, d: {**llama.trt_fields(hf, d), "share_embedding_table": True, "inter_layernorms": False},
        dims_from_trt=llama.dims_from_trt,
        hf_config=lambda cfg: llama.hf_config(cfg, "gemma"),
        forward="gemma",
    )
)
