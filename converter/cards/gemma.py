"""GemmaForCausalLM (TensorRT-LLM `models/gemma/convert.py`, `models/gemma/config.py`): Llama names, norms
stored as 1 + weight, the embedding table shared with lm_head.

HF's GemmaRMSNorm multiplies by (1 + weight) in float32; TensorRT-LLM's runtime norm multiplies by the stored
weight, so the converter stores `param + 1.0` computed in float32, then cast. The embedding is stored unscaled
(the runtime multiplies by sqrt(hidden_size)). TensorRT-LLM's GemmaConfig forces `share_embedding_table: true`
and `use_parallel_embedding = tp_size > 1`, whatever the flags say, and its converter writes no lm_head: at
tp > 1 the embedding is vocab-parallel and doubles as the lm_head.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..card import Dims, TargetRows, register
from ..errors import ShardproofError
from ..hf_fields import flag, revised, size, word
from ..transforms import ADD_ONE
from . import llama

ROWS = tuple(
    dataclasses.replace(row, ops=(ADD_ONE,)) if row.target.endswith(("layernorm.weight", "ln_f.weight")) else row
    for row in llama.ROWS
)


def layout(layout: Any, dims: Dims) -> Any:
    """GemmaConfig's rules: a vocab-parallel embedding exactly when tp > 1, the table shared with lm_head (with
    pp > 1 the last stage has no embedding, so it gets an explicit lm_head, the padded split embedding)."""
    tp, pp = layout.mapping.tp_size, layout.mapping.pp_size
    return dataclasses.replace(
        layout, use_parallel_embedding=tp > 1, embedding_sharding_dim=0, share_embedding_table=pp == 1
    )


def dims_from_hf(hf: Any) -> llama.DecoderDims:
    if getattr(hf, "use_bidirectional_attention", False):
        raise ShardproofError("use_bidirectional_attention=true: TensorRT-LLM's Gemma attention is causal")
    dims = llama.dims_from_hf(hf, mlp_bias=False)
    if not dims.tie_word_embeddings:
        raise ShardproofError("tie_word_embeddings=false: TensorRT-LLM's Gemma always uses the embedding as lm_head")
    return dims


GEMMA = register(llama.decoder_card(
    "GemmaForCausalLM", "gemma", "GemmaConfig",
    forward="gemma",
    rows=ROWS,
    dims_from_hf=dims_from_hf,
    extra_trt={"inter_layernorms": False},
    hf_fields=revised(llama.HF_FIELDS, ("mlp_bias",), vocab_size=size(256000), hidden_size=size(3072),
                      intermediate_size=size(24576), num_hidden_layers=size(28), num_attention_heads=size(16),
                      num_key_value_heads=size(16), head_dim=size(256), hidden_act=word("gelu_pytorch_tanh"),
                      max_position_embeddings=size(8192), tie_word_embeddings=flag(True),
                      use_bidirectional_attention=flag(None, optional=True)),
    hf_ignored={**llama.HF_IGNORED, "mlp_bias": "not a GemmaConfig field: Gemma's MLP hard-wires no bias"},
    strategy=llama.with_switches(lambda: llama.model_strategy().map(lambda c: {**c, "tie_word_embeddings": True}),
                                 attention_bias=True),
    norm_center=0.0,
    layout=layout,
    # TensorRT-LLM's PyTorch backend has no GemmaForCausalLM (tensorrt_llm/_torch/models/ holds Gemma 3 and later
    # only): nothing would load these weights.
    targets={llama.PYTORCH: TargetRows(unsupported="TensorRT-LLM's PyTorch backend has no GemmaForCausalLM model "
                                                    "(tensorrt_llm/_torch/models/ has no modeling_gemma.py)")},
))
