"""Olmo2ForCausalLM: the architecture card (shardproof's weight mapper) for OLMo2.

What OLMo2 changes from the Llama-style decoder, and how the checkpoint lays it out:
- q_norm and k_norm are RMSNorms over the whole q and k projections (all heads), not per head. Their weights
  are stored whole on every rank (`attention.q_layernorm.weight` [heads * head_dim], `k_layernorm` [kv_heads *
  head_dim]); the statistic spans every rank's heads, so the runtime forward all-reduces it.
- The norms come after each block, not before: x + post_attention_layernorm(attention(x)), then
  x + post_feedforward_layernorm(mlp(x)); there is no input norm.
- attention_bias puts a bias on q, k, v and o; the MLP never has one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shardproof.converter.card import Card, ConfigMap, TIED_LM_HEAD, TestSupport, first, last, layer, register
from shardproof.converter.cards import llama
from shardproof.converter.transforms import COLUMN, EMBEDDING, QKV_SPEC, REPLICATED, ROW, VOCAB

HF_LAYER = llama.HF_LAYER
ATTN = f"{HF_LAYER}.self_attn"

ROWS = (
    first("transformer.vocab_embedding.weight", "model.embed_tokens.weight", shard=EMBEDDING),
    layer("attention.qkv.weight", *(f"{ATTN}.{p}_proj.weight" for p in "qkv"), shard=QKV_SPEC),
    layer("attention.qkv.bias", *(f"{ATTN}.{p}_proj.bias" for p in "qkv"), shard=QKV_SPEC, when="qkv_bias"),
    layer("attention.q_layernorm.weight", f"{ATTN}.q_norm.weight", shard=REPLICATED),
    layer("attention.k_layernorm.weight", f"{ATTN}.k_norm.weight", shard=REPLICATED),
    layer("attention.dense.weight", f"{ATTN}.o_proj.weight", shard=ROW),
    layer("attention.dense.bias", f"{ATTN}.o_proj.bias", shard=REPLICATED, when="dense_bias"),
    layer("post_attention_layernorm.weight", f"{HF_LAYER}.post_attention_layernorm.weight", shard=REPLICATED),
    layer("mlp.fc.weight", f"{HF_LAYER}.mlp.gate_proj.weight", shard=COLUMN),
    layer("mlp.gate.weight", f"{HF_LAYER}.mlp.up_proj.weight", shard=COLUMN),
    layer("mlp.proj.weight", f"{HF_LAYER}.mlp.down_proj.weight", shard=ROW),
    layer("post_feedforward_layernorm.weight", f"{HF_LAYER}.post_feedforward_layernorm.weight", shard=REPLICATED),
    last("transformer.ln_f.weight", "model.norm.weight", shard=REPLICATED),
    last("lm_head.weight", "lm_head.weight", shard=VOCAB, when="!tie_word_embeddings"),
    last("lm_head.weight", "model.embed_tokens.weight", shard=VOCAB, when="tie_word_embeddings & !share_embedding_table"),
)


def source_shapes(d: llama.DecoderDims) -> dict[str, tuple[int, ...]]:
    q, kv, h = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim, d.hidden_size
    shapes = {name: shape for name, shape in llama.source_shapes(d).items() if "input_layernorm" not in name}
    return shapes | {f"{ATTN}.q_norm.weight": (q,), f"{ATTN}.k_norm.weight": (kv,),
                     f"{HF_LAYER}.post_feedforward_layernorm.weight": (h,)}


def dims_from_hf(hf: Any) -> llama.DecoderDims:
    return llama.dims_from_hf(hf, mlp_bias=False, qk_norm=True)


def hf_config(cfg: dict) -> dict:
    """The reassembled checkpoint's config.json: Olmo2Config's fields (head_dim too, which the model reads)."""
    base = llama.hf_config(cfg, "olmo2")
    keep = ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
            "rms_norm_eps", "rope_parameters", "attention_bias", "tie_word_embeddings", "dtype", "torch_dtype")
    return {k: base[k] for k in keep}


HF_READ = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "attention_bias", "tie_word_embeddings", "hidden_act", "rms_norm_eps",
    "max_position_embeddings", "rope_parameters", "rope_theta", "rope_scaling",
})

OLMO2 = register(Card(
    name="Olmo2ForCausalLM",
    model_type="olmo2",
    forward="olmo2",
    rows=ROWS,
    skips=(llama.SKIPS[0], TIED_LM_HEAD),
    source_shapes=source_shapes,
    config=ConfigMap(dims_from_hf=dims_from_hf, trt_fields=llama.trt_fields, dims_from_trt=llama.dims_from_trt,
                     hf_config=hf_config, hf_read=HF_READ),
    tests=TestSupport(config_class="Olmo2Config",
                      tiny=dict(pad_token_id=None, bos_token_id=None, eos_token_id=None),  # defaults beyond vocab 97
                      strategy=llama.with_switches(llama.model_strategy, attention_bias=True),
                      selftest={**llama.SELFTEST, "attention_bias": True}),
    golden_dir=Path(__file__).parent / "goldens",
))
