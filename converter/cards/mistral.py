"""MistralForCausalLM: TensorRT-LLM converts it with the Llama code path and tables; q/k/v/o carry no bias."""

from __future__ import annotations

from ..card import register
from . import llama

MISTRAL = register(llama.decoder_card(
    "MistralForCausalLM", "mistral", "MistralConfig",
    dims_from_hf=lambda hf: llama.dims_from_hf(hf, qkv_bias=False, dense_bias=False),
    extra_hf={"sliding_window": None},
    hf_ignored={**llama.HF_IGNORED, **llama.SLIDING_WINDOW_IGNORED},
))
