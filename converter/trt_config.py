"""TensorRT-LLM's config.json for a plan (PretrainedConfig.to_dict field names)."""

from __future__ import annotations

from typing import Any

from .plan import Plan


def trt_config(plan: Plan, hf_config: Any) -> dict:
    """The config.json of the converted checkpoint: generic fields, the family's fields, mapping, quantization."""
    d, layout = plan.dims, plan.layout
    return {
        "architecture": plan.architecture.name,
        "dtype": layout.dtype,
        "logits_dtype": "float32",
        "vocab_size": d.vocab_size,
        "hidden_size": d.hidden_size,
        "num_hidden_layers": d.num_layers,
        "num_attention_heads": d.num_heads,
        "num_key_value_heads": d.num_kv_heads,
        "head_size": d.head_dim,
        "intermediate_size": d.intermediate_size,
        "use_parallel_embedding": layout.use_parallel_embedding,
        "embedding_sharding_dim": layout.embedding_sharding_dim,
        "share_embedding_table": False,
        "tie_word_embeddings": d.tie_word_embeddings,
        **plan.architecture.trt_fields(hf_config, d),
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
