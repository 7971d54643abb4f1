"""Phi3ForCausalLM (TensorRT-LLM `models/phi3/convert.py`, `config.py`, `model.py`): fused HF projections
re-split per rank, a swiglu MLP, and longrope carried in TensorRT-LLM's `long_rope` fields.

- `self_attn.qkv_proj` ([q; k; v]) is chunked by heads, then laid out as every Llama-family qkv: per rank
  [q_r; k_r; v_r], KV heads replicated when tp > num_key_value_heads.
- `mlp.gate_up_proj` ([gate; up]) becomes `mlp.fc` with the halves swapped (`load_weights_from_hf_model`),
  because TensorRT-LLM's swiglu(t) = silu(second half) * first half; each rank keeps [up_r; gate_r].
- target `trtllm-pytorch` (`modeling_phi3.py` `Phi3ForCausalLM.load_weights`): the backend slices the fused
  sources into q, k, v and gate, up and loads them through the Llama-family fused modules, so each rank holds
  `qkv_proj` `[q_r; k_r; v_r]` and `gate_up_proj` `[gate_r; up_r]` (HF's order, not the checkpoint's `mlp.fc`).
- longrope (`su` in older configs): `position_embedding_type: long_rope` with the factors, the original length
  and the mscales (`Phi3Config.from_hugging_face` names them), whatever max_position_embeddings is.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..card import Card, ConfigMap, Shape, TargetRows, TestSupport, first, last, layer, register
from ..errors import ShardproofError
from ..hf_fields import number, real, revised, size
from ..transforms import EMBEDDING, QKV_PARTS, QKV_SPEC, REPLICATED, ROW, VOCAB, EqualChunks, FusedColumn, Reorder
from . import llama

HF_LAYER = llama.HF_LAYER

ROWS = (
    first("transformer.vocab_embedding.weight", "model.embed_tokens.weight", shard=EMBEDDING),
    layer("input_layernorm.weight", f"{HF_LAYER}.input_layernorm.weight", shard=REPLICATED),
    layer("attention.qkv.weight", f"{HF_LAYER}.self_attn.qkv_proj.weight", shard=QKV_SPEC, ops=(QKV_PARTS,)),
    layer("attention.dense.weight", f"{HF_LAYER}.self_attn.o_proj.weight", shard=ROW),
    layer("post_layernorm.weight", f"{HF_LAYER}.post_attention_layernorm.weight", shard=REPLICATED),
    # [gate; up] -> [up; gate], then each half split column-parallel: rank r keeps [up_r; gate_r]
    layer("mlp.fc.weight", f"{HF_LAYER}.mlp.gate_up_proj.weight", shard=FusedColumn(2),
          ops=(EqualChunks(2), Reorder((1, 0)))),
    layer("mlp.proj.weight", f"{HF_LAYER}.mlp.down_proj.weight", shard=ROW),
    last("transformer.ln_f.weight", "model.norm.weight", shard=REPLICATED),
    last("lm_head.weight", "lm_head.weight", shard=VOCAB, when="!tie_word_embeddings"),
    last("lm_head.weight", "model.embed_tokens.weight", shard=VOCAB, when="tie_word_embeddings & !share_embedding_table"),
)


# The PyTorch backend's rows: the Llama family's, with the fused sources chunked first (no biases, no q/k norms).
_FUSED = {
    f"{HF_LAYER}.self_attn.qkv_proj.weight": llama.pt_layer(
        "self_attn.qkv_proj.weight", f"{HF_LAYER}.self_attn.qkv_proj.weight", shard=QKV_SPEC, ops=(QKV_PARTS,)),
    f"{HF_LAYER}.mlp.gate_up_proj.weight": llama.pt_layer(
        "mlp.gate_up_proj.weight", f"{HF_LAYER}.mlp.gate_up_proj.weight", shard=FusedColumn(2), ops=(EqualChunks(2),)),
}
PYTORCH_ROWS = tuple(_FUSED.get(row.target, row) for row in llama.PYTORCH_ROWS
                     if not row.target.endswith(".bias") and "_norm." not in row.target)
PYTORCH_TARGETS = {llama.PYTORCH: dataclasses.replace(llama.PYTORCH_TARGETS[llama.PYTORCH], rows=PYTORCH_ROWS)}


def source_shapes(d: llama.DecoderDims) -> dict[str, Shape]:
    q, kv, h, i = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim, d.hidden_size, d.intermediate_size
    return {
        "model.embed_tokens.weight": (d.vocab_size, h),
        f"{HF_LAYER}.input_layernorm.weight": (h,),
        f"{HF_LAYER}.self_attn.qkv_proj.weight": (q + 2 * kv, h),
        f"{HF_LAYER}.self_attn.o_proj.weight": (h, q),
        f"{HF_LAYER}.post_attention_layernorm.weight": (h,),
        f"{HF_LAYER}.mlp.gate_up_proj.weight": (2 * i, h),
        f"{HF_LAYER}.mlp.down_proj.weight": (h, i),
        "model.norm.weight": (h,),
        "lm_head.weight": (d.vocab_size, h),
    }


def dims_from_hf(hf: Any) -> llama.DecoderDims:
    """Phi-3's dims: no biases; refused: an activation other than silu (TensorRT-LLM makes silu swiglu and
    passes any other through, which its fused fc cannot run), partial rotary, head_dim != hidden / heads."""
    if hf.hidden_act != "silu":
        raise ShardproofError(f"hidden_act={hf.hidden_act!r}: TensorRT-LLM's Phi-3 fused MLP runs silu as swiglu only")
    partial = (hf.rope_parameters or {}).get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise ShardproofError(f"partial_rotary_factor={partial}: partial rotary is not supported for Phi-3 yet")
    dims = llama.dims_from_hf(hf, qkv_bias=False, dense_bias=False)
    if dims.head_dim * dims.num_heads != dims.hidden_size:
        raise ShardproofError(f"head_dim={dims.head_dim}: TensorRT-LLM's Phi-3 attention takes hidden_size / heads")
    return dims


def longrope_mscale(params: dict, max_position_embeddings: int) -> float:
    """The attention factor of a longrope (transformers' `_compute_longrope_parameters`): `attention_factor`, else
    sqrt(1 + ln(factor) / ln(original)) with `factor` (else max / original positions), 1 when factor <= 1."""
    if params.get("attention_factor") is not None:
        return params["attention_factor"]
    original = params["original_max_position_embeddings"]
    factor = params.get("factor")
    if factor is None:
        factor = max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def longrope_fields(hf: Any) -> dict:
    """TensorRT-LLM's long_rope fields for a longrope HF config ({} for default rope)."""
    params = hf.rope_parameters or {}
    if params.get("rope_type", "default") == "default":
        return {}
    mscale = longrope_mscale(params, hf.max_position_embeddings)
    return {
        "position_embedding_type": "long_rope",
        "original_max_position_embeddings": params["original_max_position_embeddings"],
        "longrope_scaling_short_factors": list(params["short_factor"]),
        "longrope_scaling_long_factors": list(params["long_factor"]),
        "longrope_short_mscale": mscale,
        "longrope_long_mscale": mscale,
    }


def standard_phi3(values: dict[str, Any]) -> dict[str, Any]:
    """Phi3Config's rope (its `convert_rope_params_to_dict`, `validate_rope`): partial_rotary_factor folded in, the
    top-level original_max_position_embeddings over the parameters', su and yarn read as longrope, only default
    and longrope taken, each factor list a list of numbers of half the rotary dimensions."""
    given = dict(values["rope_scaling"] or values["rope_parameters"] or {})
    given.setdefault("partial_rotary_factor", values["partial_rotary_factor"])
    params = llama.rope_parameters({**values, "rope_scaling": given},
                                   original=values["original_max_position_embeddings"])
    if params["rope_type"] in ("su", "yarn"):
        params["rope_type"] = "longrope"
    heads_dim = values["hidden_size"] // values["num_attention_heads"]
    llama.check_rope(params, values["head_dim"] or heads_dim)
    if params["rope_type"] not in ("default", "longrope"):
        raise ShardproofError(f"rope_parameters: rope_type {params['rope_type']!r}; Phi3Config takes default or longrope")
    partial = params["partial_rotary_factor"]
    real(None).check("rope_parameters.partial_rotary_factor", partial)
    half = int(heads_dim * partial) // 2
    for key in ("short_factor", "long_factor"):
        factors = params.get(key)
        if factors is not None and not (isinstance(factors, list) and len(factors) == half
                                        and all(type(x) in (int, float) for x in factors)):
            raise ShardproofError(f"rope_parameters: {key} must be a list of {half} numbers")
    return {**values, "rope_parameters": params, "rope_scaling": params}


def trt_fields(hf: Any, d: llama.DecoderDims) -> dict:
    """Phi3Config.from_hugging_face: silu becomes swiglu, rotary scaling only through the long_rope fields."""
    return {**llama.trt_fields(hf, d), "hidden_act": "swiglu", "rotary_scaling": None, "rotary_pct": 1.0,
            **longrope_fields(hf)}


def hf_config(cfg: dict) -> dict:
    """The HF config.json the reassembler writes: transformers' Phi3Config, rope rebuilt from long_rope."""
    out = llama.hf_config(cfg, "phi3")
    for name in ("attention_bias", "mlp_bias"):
        del out[name]
    rope = {"rope_type": "default", "rope_theta": cfg["rotary_base"], "partial_rotary_factor": 1.0}
    if cfg.get("position_embedding_type") == "long_rope":
        original = cfg["original_max_position_embeddings"]
        rope |= {"rope_type": "longrope", "original_max_position_embeddings": original,
                 "short_factor": cfg["longrope_scaling_short_factors"],
                 "long_factor": cfg["longrope_scaling_long_factors"],
                 "attention_factor": cfg["longrope_long_mscale"]}
        out["original_max_position_embeddings"] = original
    # token ids are tokenizer metadata a TensorRT-LLM checkpoint does not hold; Phi3Config's defaults (32000)
    # would not fit a smaller vocabulary
    tokens = dict.fromkeys(("pad_token_id", "bos_token_id", "eos_token_id"))
    return {**out, **tokens, "hidden_act": "silu", "rope_parameters": rope, "rope_scaling": None}


def _model_strategy() -> Any:
    """The Llama-family strategy (Phi-3's head_dim is hidden/heads), sometimes with longrope factors."""
    from hypothesis import strategies as st

    def phi3(config: dict, longrope: bool, seed: int) -> dict:
        heads = config["num_attention_heads"]
        hidden = config["hidden_size"] * 2  # an even head_dim
        config = {k: v for k, v in config.items() if k != "head_dim"} | {"hidden_size": hidden}
        if longrope:  # Phi3Config's top-level original_max_position_embeddings takes precedence: set both
            half = hidden // heads // 2
            config["original_max_position_embeddings"] = ORIGINAL
            config["rope_parameters"] = {
                "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": ORIGINAL,
                "short_factor": [1.0 + 0.01 * ((seed + k) % 7) for k in range(half)],
                "long_factor": [1.0 + 2.0 * k + 0.5 * (seed % 3) for k in range(half)],
            }
        return config

    return st.builds(phi3, llama.model_strategy(), st.booleans(), st.integers(0, 100))


# Phi-3-mini-128k's longrope profile, shrunk to the tiny models' head_dim (every 6th of 48 factors) and
# original_max_position_embeddings 64, so the self-test's 256-token sequences run the long branch.
ORIGINAL = 64
LONGROPE_128K = {
    "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": ORIGINAL,
    "short_factor": [1.0, 1.0499999523162842, 1.0999999046325684, 1.339999794960022, 1.8499997854232788,
                     2.0199997425079346, 2.0299997329711914, 2.0799996852874756],
    "long_factor": [1.0700000524520874, 2.129999876022339, 9.930000305175781, 19.809999465942383,
                    46.20000457763672, 57.28738784790039, 63.41739273071289, 64.11434936523438],
}

PHI3 = register(Card(
    name="Phi3ForCausalLM",
    model_type="phi3",
    forward="phi3",
    rows=ROWS,
    skips=llama.SKIPS,
    source_shapes=source_shapes,
    config=ConfigMap(
        dims_from_hf=dims_from_hf,
        trt_fields=trt_fields,
        dims_from_trt=lambda cfg: llama.dims_from_trt(cfg, dense_bias=False),
        hf_config=hf_config,
        # partial_rotary_factor: a top-level spelling transformers folds into rope_parameters (refused unless 1.0)
        hf_fields=revised(llama.HF_FIELDS, ("attention_bias", "mlp_bias"), vocab_size=size(32064),
                          hidden_size=size(3072), intermediate_size=size(8192), max_position_embeddings=size(4096),
                          rms_norm_eps=number(1e-5), original_max_position_embeddings=size(4096),
                          partial_rotary_factor=real(1.0)),
        standardize=standard_phi3,
        hf_ignored={**llama.SLIDING_WINDOW_IGNORED,
                    "resid_pdrop": "training only (dropout is off at inference)",
                    "embd_pdrop": "training only (dropout is off at inference)"},
    ),
    targets=PYTORCH_TARGETS,
    tests=TestSupport(config_class="Phi3Config", strategy=_model_strategy,
                      tiny=dict(pad_token_id=None, bos_token_id=None, eos_token_id=None),
                      selftest=dict(rope_parameters=LONGROPE_128K, original_max_position_embeddings=ORIGINAL)),
))
