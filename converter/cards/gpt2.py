"""GPT2LMHeadModel (TensorRT-LLM `models/gpt/convert.py` `load_weights_from_hf_model`, `models/gpt/config.py`
`GPTConfig.from_hugging_face`, gpt_variant "gpt2").

HF's Conv1D stores weights `[in, out]`, so every linear weight is transposed; the fused `attn.c_attn` ([q; k; v])
is split into q, k, v and re-fused per rank as `[q_r; k_r; v_r]` (multi-head: one KV head per head). LayerNorms
carry a bias, positions are learned (`wpe`, on the first stage, sharded like the token embedding), and lm_head is
the padded, vocab-split `wte` unless the config unties it. Rules and sources are in docs/format.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..card import (Card, ConfigMap, Dims, Shape, Skip, TIED_LM_HEAD, TargetRows, TestSupport, first, last, layer,
                    register)
from ..errors import ShardproofError
from ..hf_fields import flag, number, size, word
from ..transforms import COLUMN, EMBEDDING, QKV_PARTS, QKV_SPEC, REPLICATED, ROW, TRANSPOSE, VOCAB

HF_LAYER = "transformer.h.{i}"


@dataclass(frozen=True)
class GPT2Dims(Dims):
    """A GPT-2: multi-head attention (as many KV heads as heads), learned positions, biases everywhere."""

    vocab_size: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    num_positions: int
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_size % self.num_heads:
            raise ShardproofError(f"n_embd={self.hidden_size} is not a multiple of n_head={self.num_heads}")

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def _linear(target: str, source: str, weight_shard: Any, bias_shard: Any) -> tuple:
    """A Conv1D's weight (transposed to `[out, in]`) and bias rows."""
    return (
        layer(f"{target}.weight", f"{HF_LAYER}.{source}.weight", shard=weight_shard, ops=(TRANSPOSE,)),
        layer(f"{target}.bias", f"{HF_LAYER}.{source}.bias", shard=bias_shard),
    )


def _norm(target: str, source: str) -> tuple:
    return tuple(layer(f"{target}.{p}", f"{HF_LAYER}.{source}.{p}", shard=REPLICATED) for p in ("weight", "bias"))


ROWS = (
    first("transformer.vocab_embedding.weight", "transformer.wte.weight", shard=EMBEDDING),
    # split_embedding in load_weights_from_hf_model shards wpe exactly as it shards wte
    first("transformer.position_embedding.weight", "transformer.wpe.weight", shard=EMBEDDING),
    *_norm("input_layernorm", "ln_1"),
    # transpose to [3H, H], then q, k, v (dim 0 in thirds) for the fused-QKV shard; the 1-D bias is only split
    layer("attention.qkv.weight", f"{HF_LAYER}.attn.c_attn.weight", shard=QKV_SPEC, ops=(TRANSPOSE, QKV_PARTS)),
    layer("attention.qkv.bias", f"{HF_LAYER}.attn.c_attn.bias", shard=QKV_SPEC, ops=(QKV_PARTS,)),
    *_linear("attention.dense", "attn.c_proj", ROW, REPLICATED),
    *_norm("post_layernorm", "ln_2"),
    *_linear("mlp.fc", "mlp.c_fc", COLUMN, COLUMN),
    *_linear("mlp.proj", "mlp.c_proj", ROW, REPLICATED),
    last("transformer.ln_f.weight", "transformer.ln_f.weight", shard=REPLICATED),
    last("transformer.ln_f.bias", "transformer.ln_f.bias", shard=REPLICATED),
    last("lm_head.weight", "transformer.wte.weight", shard=VOCAB, when="tie_word_embeddings"),
    last("lm_head.weight", "lm_head.weight", shard=VOCAB, when="!tie_word_embeddings"),
)

SKIPS = (
    Skip(r"\.attn\.(masked_)?bias$", "the causal-mask buffers older transformers saved; the runtime masks itself"),
    TIED_LM_HEAD,
)


def source_shapes(d: GPT2Dims) -> dict[str, Shape]:
    """Shape of every source tensor of a GPT2LMHeadModel checkpoint (Conv1D weights are `[in, out]`)."""
    h, i = d.hidden_size, d.intermediate_size
    return {
        "transformer.wte.weight": (d.vocab_size, h),
        "transformer.wpe.weight": (d.num_positions, h),
        f"{HF_LAYER}.ln_1.weight": (h,),
        f"{HF_LAYER}.ln_1.bias": (h,),
        f"{HF_LAYER}.attn.c_attn.weight": (h, 3 * h),
        f"{HF_LAYER}.attn.c_attn.bias": (3 * h,),
        f"{HF_LAYER}.attn.c_proj.weight": (h, h),
        f"{HF_LAYER}.attn.c_proj.bias": (h,),
        f"{HF_LAYER}.ln_2.weight": (h,),
        f"{HF_LAYER}.ln_2.bias": (h,),
        f"{HF_LAYER}.mlp.c_fc.weight": (h, i),
        f"{HF_LAYER}.mlp.c_fc.bias": (i,),
        f"{HF_LAYER}.mlp.c_proj.weight": (i, h),
        f"{HF_LAYER}.mlp.c_proj.bias": (h,),
        "transformer.ln_f.weight": (h,),
        "transformer.ln_f.bias": (h,),
        "lm_head.weight": (d.vocab_size, h),
    }


# Switches that change the math and that GPTConfig cannot express: refused unless at HF's default.
REFUSED_UNLESS_DEFAULT = {
    "scale_attn_weights": (True, "TensorRT-LLM always scales attention scores by 1/sqrt(head_dim)"),
    "scale_attn_by_inverse_layer_idx": (False, "TensorRT-LLM has no per-layer 1/(layer+1) attention scaling"),
    "add_cross_attention": (False, "a decoder-only checkpoint has no cross-attention"),
}


def dims_from_hf(hf: Any) -> GPT2Dims:
    """Model dimensions of an HF GPT2Config; ShardproofError for a switch TensorRT-LLM cannot express."""
    for name, (default, why) in REFUSED_UNLESS_DEFAULT.items():
        if getattr(hf, name, default) != default:
            raise ShardproofError(f"{name}={getattr(hf, name)!r}: {why}")
    return GPT2Dims(
        num_layers=hf.n_layer,
        vocab_size=hf.vocab_size,
        hidden_size=hf.n_embd,
        num_heads=hf.n_head,
        intermediate_size=hf.n_inner or 4 * hf.n_embd,  # GPTConfig.from_hugging_face: n_inner None -> 4 * n_embd
        num_positions=hf.n_positions,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
    )


def trt_fields(hf: Any, d: GPT2Dims) -> dict:
    """GPT-2's fields of TensorRT-LLM's config.json (GPTConfig.from_hugging_face, GPTConfig.to_dict)."""
    return {
        "vocab_size": d.vocab_size,
        "hidden_size": d.hidden_size,
        "num_hidden_layers": d.num_layers,
        "num_attention_heads": d.num_heads,
        "num_key_value_heads": d.num_kv_heads,
        "head_size": d.head_dim,
        "intermediate_size": d.intermediate_size,
        "hidden_act": hf.activation_function,
        "norm_epsilon": float(hf.layer_norm_epsilon),
        "position_embedding_type": "learned_absolute",
        "max_position_embeddings": d.num_positions,
        "tie_word_embeddings": d.tie_word_embeddings,
        "gpt_variant": "gpt2",
        "bias": True,
        "q_scaling": 1.0,
        "embedding_scale": None,
        "apply_query_key_layer_scaling": False,
        "rotary_pct": 1.0,
        "rotary_base": 10000.0,
        "rotary_scaling": None,
        "inner_layernorm": False,
        "norm_before_bmm1": False,
        "qk_layernorm": False,
    }


def dims_from_trt(cfg: dict) -> GPT2Dims:
    """Model dimensions recorded in a TensorRT-LLM config.json."""
    return GPT2Dims(
        num_layers=cfg["num_hidden_layers"],
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_heads=cfg["num_attention_heads"],
        intermediate_size=cfg["intermediate_size"],
        num_positions=cfg["max_position_embeddings"],
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
    )


def hf_config(cfg: dict) -> dict:
    """An HF GPT2Config config.json for a TensorRT-LLM GPT-2 config (the reassembler's output)."""
    return {
        "architectures": [cfg["architecture"]],
        "model_type": "gpt2",
        "vocab_size": cfg["vocab_size"],
        "n_embd": cfg["hidden_size"],
        "n_layer": cfg["num_hidden_layers"],
        "n_head": cfg["num_attention_heads"],
        "n_inner": cfg["intermediate_size"],
        "n_positions": cfg["max_position_embeddings"],
        "activation_function": cfg["hidden_act"],
        "layer_norm_epsilon": cfg["norm_epsilon"],
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", True)),
        "dtype": cfg["dtype"],
        "torch_dtype": cfg["dtype"],
    }


# GPT2Config's (transformers 5) types and defaults of the fields the translation reads.
HF_FIELDS = {
    "vocab_size": size(50257),
    "n_embd": size(768),
    "n_layer": size(12),
    "n_head": size(12),
    "n_inner": size(None, optional=True),
    "n_positions": size(1024),
    "activation_function": word("gelu_new"),
    "layer_norm_epsilon": number(1e-5),
    "tie_word_embeddings": flag(True),
    **{name: flag(default) for name, (default, _) in REFUSED_UNLESS_DEFAULT.items()},
}
DROPOUT = "training only (dropout is off at inference)"
SUMMARY = "the sequence-summary head of GPT2DoubleHeadsModel, which a causal LM does not have"
HF_IGNORED = {
    "n_ctx": "the context size of old configs; transformers reads n_positions",
    "attn_pdrop": DROPOUT,
    "embd_pdrop": DROPOUT,
    "resid_pdrop": DROPOUT,
    "summary_type": SUMMARY,
    "summary_use_proj": SUMMARY,
    "summary_activation": SUMMARY,
    "summary_proj_to_labels": SUMMARY,
    "summary_first_dropout": SUMMARY,
    "reorder_and_upcast_attn": "computes the same attention with float32 scores (TensorRT-LLM's softmax is "
    "float32 already): a precision detail, not a different function",
    "task_specific_params": "generation settings (sampling), not the model's math",
}

SIZES = {  # the shared tiny sizes as GPT2Config spells them; it has no separate KV heads or head_dim
    "hidden_size": "n_embd",
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
    "intermediate_size": "n_inner",
    "max_position_embeddings": "n_positions",
    "num_key_value_heads": None,
    "head_dim": None,
}


def model_strategy() -> Any:
    """Config overrides for the property tests, in the shared size names: heads, head sizes, odd vocab, ties."""
    from hypothesis import strategies as st

    @st.composite
    def draw(draw: Callable) -> dict:
        heads = draw(st.sampled_from([1, 2, 4, 8]))
        return dict(
            num_attention_heads=heads,
            num_key_value_heads=heads,  # read by the tests' layout rules; GPT2Config has no such field
            hidden_size=heads * draw(st.sampled_from([2, 4, 6, 8])),
            intermediate_size=8 * draw(st.integers(2, 6)),
            num_hidden_layers=draw(st.integers(1, 4)),
            vocab_size=draw(st.integers(17, 131)),
            max_position_embeddings=draw(st.integers(5, 70)),
            tie_word_embeddings=draw(st.booleans()),
        )

    return draw()


GPT2 = register(Card(
    name="GPT2LMHeadModel",
    model_type="gpt2",
    forward="gpt2",
    rows=ROWS,
    skips=SKIPS,
    source_shapes=source_shapes,
    config=ConfigMap(
        dims_from_hf=dims_from_hf,
        trt_fields=trt_fields,
        dims_from_trt=dims_from_trt,
        hf_config=hf_config,
        hf_fields=HF_FIELDS,
        hf_ignored=HF_IGNORED,
    ),
    tests=TestSupport(
        config_class="GPT2Config",
        strategy=model_strategy,
        tiny=dict(num_key_value_heads=4),
        norms=r"\.ln_(1|2|f)\.weight$",
        config_names=SIZES,
    ),
    targets={"trtllm-pytorch": TargetRows(unsupported="TensorRT-LLM's PyTorch backend has no GPT2LMHeadModel model "
                                                      "(tensorrt_llm/_torch/models/ has no modeling_gpt2.py)")},
))
