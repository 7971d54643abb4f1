"""LlamaForCausalLM (TensorRT-LLM models/llama/convert.py), and the Llama-family tables others reuse."""

from __future__ import annotations

from typing import Any

from ..architecture import Architecture, ModelDims, Shape, Skip, first, last, layer, register

HF_LAYER = "model.layers.{i}"

RULES = (
    first("transformer.vocab_embedding.weight", "model.embed_tokens.weight", shard="embedding"),
    layer("input_layernorm.weight", f"{HF_LAYER}.input_layernorm.weight", shard="replicated"),
    layer("attention.qkv.weight", *(f"{HF_LAYER}.self_attn.{p}_proj.weight" for p in "qkv"), shard="qkv"),
    layer("attention.qkv.bias", *(f"{HF_LAYER}.self_attn.{p}_proj.bias" for p in "qkv"), shard="qkv", when="qkv_bias"),
    layer("attention.q_layernorm.weight", f"{HF_LAYER}.self_attn.q_norm.weight", shard="replicated", when="qk_norm"),
    layer("attention.k_layernorm.weight", f"{HF_LAYER}.self_attn.k_norm.weight", shard="replicated", when="qk_norm"),
    layer("attention.dense.weight", f"{HF_LAYER}.self_attn.o_proj.weight", shard="row"),
    layer("attention.dense.bias", f"{HF_LAYER}.self_attn.o_proj.bias", shard="replicated", when="dense_bias"),
    layer("post_layernorm.weight", f"{HF_LAYER}.post_attention_layernorm.weight", shard="replicated"),
    # GatedMLP computes act(fc(x)) * gate(x): HF's gate_proj is the activated branch, so it becomes `fc`.
    layer("mlp.fc.weight", f"{HF_LAYER}.mlp.gate_proj.weight", shard="column"),
    layer("mlp.fc.bias", f"{HF_LAYER}.mlp.gate_proj.bias", shard="column", when="mlp_bias"),
    layer("mlp.gate.weight", f"{HF_LAYER}.mlp.up_proj.weight", shard="column"),
    layer("mlp.gate.bias", f"{HF_LAYER}.mlp.up_proj.bias", shard="column", when="mlp_bias"),
    layer("mlp.proj.weight", f"{HF_LAYER}.mlp.down_proj.weight", shard="row"),
    layer("mlp.proj.bias", f"{HF_LAYER}.mlp.down_proj.bias", shard="replicated", when="mlp_bias"),
    last("transformer.ln_f.weight", "model.norm.weight", shard="replicated"),
    last("lm_head.weight", "lm_head.weight", shard="vocab", when="!tie_word_embeddings"),
    last("lm_head.weight", "model.embed_tokens.weight", shard="vocab", when="tie_word_embeddings"),
)

SKIPS = (
    Skip(r"\.rotary_emb\.inv_freq$", "rotary frequencies are recomputed by the runtime from rotary_base"),
    Skip(r"^lm_head\.weight$", "a tied model's lm_head is the embedding", when="tie_word_embeddings"),
)


def source_shapes(d: ModelDims) -> dict[str, Shape]:
    """Shape of every source tensor a Llama-family checkpoint may hold."""
    q, kv, h, i = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim, d.hidden_size, d.intermediate_size
    attn, mlp = f"{HF_LAYER}.self_attn", f"{HF_LAYER}.mlp"
    return {
        "model.embed_tokens.weight": (d.vocab_size, h),
        f"{HF_LAYER}.input_layernorm.weight": (h,),
        f"{attn}.q_proj.weight": (q, h),
        f"{attn}.k_proj.weight": (kv, h),
        f"{attn}.v_proj.weight": (kv, h),
        f"{attn}.q_proj.bias": (q,),
        f"{attn}.k_proj.bias": (kv,),
        f"{attn}.v_proj.bias": (kv,),
        f"{attn}.q_norm.weight": (d.head_dim,),
        f"{attn}.k_norm.weight": (d.head_dim,),
        f"{attn}.o_proj.weight": (h, q),
        f"{attn}.o_proj.bias": (h,),
        f"{HF_LAYER}.post_attention_layernorm.weight": (h,),
        f"{mlp}.gate_proj.weight": (i, h),
        f"{mlp}.gate_proj.bias": (i,),
        f"{mlp}.up_proj.weight": (i, h),
        f"{mlp}.up_proj.bias": (i,),
        f"{mlp}.down_proj.weight": (h, i),
        f"{mlp}.down_proj.bias": (h,),
        "model.norm.weight": (h,),
        "lm_head.weight": (d.vocab_size, h),
    }


def rope(hf: Any) -> tuple[float, dict | None]:
    """(rotary_base, rotary_scaling) from an HF config of transformers 4 (rope_theta, rope_scaling) or 5 (rope_parameters)."""
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    base = float(params.pop("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    if params.get("rope_type", params.get("type", "default")) == "default":
        return base, None
    return base, params


def dims_from_hf(hf: Any, *, qkv_bias: bool | None = None, dense_bias: bool | None = None, qk_norm: bool = False) -> ModelDims:
    """Model dimensions of a Llama-family HF config; the family's modules pin the switches their code hard-wires."""
    heads = hf.num_attention_heads
    attention_bias = bool(getattr(hf, "attention_bias", False))
    return ModelDims(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        intermediate_size=hf.intermediate_size,
        qkv_bias=attention_bias if qkv_bias is None else qkv_bias,
        dense_bias=attention_bias if dense_bias is None else dense_bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        qk_norm=qk_norm,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
    )


def trt_fields(hf: Any, d: ModelDims) -> dict:
    """The Llama family's fields of TensorRT-LLM's config.json (LLaMAConfig.from_hugging_face)."""
    base, scaling = rope(hf)
    return {
        "hidden_act": hf.hidden_act,
        "norm_epsilon": float(hf.rms_norm_eps),
        "position_embedding_type": "rope_gpt_neox",
        "max_position_embeddings": hf.max_position_embeddings,
        "rotary_base": base,
        "rotary_scaling": scaling,
        "rotary_embedding_dim": d.head_dim,
        "attn_bias": d.qkv_bias,
        "mlp_bias": d.mlp_bias,
        "qk_layernorm": d.qk_norm,
        "residual_mlp": False,
    }


def dims_from_trt(cfg: dict, *, dense_bias: bool | None = None) -> ModelDims:
    """Model dimensions recorded in a TensorRT-LLM config.json."""
    return ModelDims(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg["num_key_value_heads"],
        head_dim=cfg["head_size"],
        intermediate_size=cfg["intermediate_size"],
        qkv_bias=bool(cfg.get("attn_bias", False)),
        dense_bias=bool(cfg.get("attn_bias", False)) if dense_bias is None else dense_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=bool(cfg.get("qk_layernorm", False)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def hf_config(cfg: dict, model_type: str) -> dict:
    """An HF config.json for a Llama-family TensorRT-LLM config (the reassembler's output)."""
    scaling = cfg.get("rotary_scaling")
    rope_parameters = {**(scaling or {"rope_type": "default"}), "rope_theta": cfg["rotary_base"]}
    return {
        "architectures": [cfg["architecture"]],
        "model_type": model_type,
        "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"],
        "intermediate_size": cfg["intermediate_size"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_attention_heads": cfg["num_attention_heads"],
        "num_key_value_heads": cfg["num_key_value_heads"],
        "head_dim": cfg["head_size"],
        "hidden_act": cfg["hidden_act"],
        "max_position_embeddings": cfg["max_position_embeddings"],
        "rms_norm_eps": cfg["norm_epsilon"],
        # transformers 5 reads rope_parameters; transformers 4 reads rope_theta and rope_scaling.
        "rope_parameters": rope_parameters,
        "rope_theta": cfg["rotary_base"],
        "rope_scaling": scaling,
        "attention_bias": bool(cfg.get("attn_bias", False)),
        "mlp_bias": bool(cfg.get("mlp_bias", False)),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "dtype": cfg["dtype"],
        "torch_dtype": cfg["dtype"],
    }


LLAMA = register(
    Architecture(
        name="LlamaForCausalLM",
        model_type="llama",
        rules=RULES,
        source_shapes=source_shapes,
        skips=SKIPS,
        dims_from_hf=dims_from_hf,
        trt_fields=trt_fields,
        dims_from_trt=dims_from_trt,
        hf_config=lambda cfg: hf_config(cfg, "llama"),
        forward="llama",
    )
)
