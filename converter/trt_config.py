"""TensorRT-LLM's config.json for a plan (PretrainedConfig.to_dict field names)."""

from __future__ import annotations

from typing import Any

from .plan import Plan


def trt_config(plan: Plan, hf_config: Any) -> dict:
    """The config.json of the converted checkpoint: layout fields, the card's fields, mapping, quantization."""
    layout = plan.layout
    return {
        "architecture": plan.card.name,
        "dtype": layout.dtype,
        "logits_dtype": "float32",
        "use_parallel_embedding": layout.use_parallel_embedding,
        "embedding_sharding_dim": layout.embedding_sharding_dim,
        "share_embedding_table": layout.share_embedding_table,
        **plan.card.config.trt_fields(hf_config, plan.dims),
        "mapping": layout.mapping.to_config(),
        "quantization": {
            "quant_algo": None,
            "kv_cache_quant_algo": None,
            "group_size": 128,
            "smoothquant_val": 0.5,
            "clamp_val": None,
            "use_meta_recipe": False,
            "has_zero_point": False,
            "pre_quant_scale": False,
            "exclude_modules": None,
        },
    }
