"""llama: TensorRT-LLM's LLaMAForCausalLM (models/llama/model.py), which also runs Mistral and Qwen3.

Llama's Attention gives dense a bias exactly when attn_bias (HF's o_proj follows attention_bias); q/k
layernorm (Qwen3) when the config's qk_layernorm; hidden_act from the config.
"""

from ..family import register
from .decoder import Decoder

LLAMA = register(Decoder("llama", dense_bias=lambda cfg: cfg.attn_bias))
