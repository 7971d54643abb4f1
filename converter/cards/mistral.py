"""MistralForCausalLM: TensorRT-LLM converts it with the Llama code path and tables; no projection carries a bias."""

from __future__ import annotations

from ..card import register
from ..hf_fields import revised, size
from . import llama

MISTRAL = register(llama.decoder_card(
    "MistralForCausalLM", "mistral", "MistralConfig",
    dims_from_hf=lambda hf: llama.dims_from_hf(hf, qkv_bias=False, dense_bias=False, mlp_bias=False),
    extra_hf={"sliding_window": None},
    hf_fields=revised(llama.HF_FIELDS, ("attention_bias", "mlp_bias"), intermediate_size=size(14336),
                      max_position_embeddings=size(131072), num_key_value_heads=size(8)),
    hf_ignored={**llama.HF_IGNORED, **llama.SLIDING_WINDOW_IGNORED,
                "attention_bias": "not a MistralConfig field: Mistral's attention hard-wires no bias",
                "mlp_bias": "not a MistralConfig field: Mistral's MLP hard-wires no bias"},
))
