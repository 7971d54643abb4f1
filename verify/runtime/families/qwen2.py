"""qwen2: TensorRT-LLM's QWenForCausalLM for qwen_type qwen2 (models/qwen/model.py).

q/k/v carry a bias (attn_bias, which the converter always sets); the attention is built with
dense_bias=False, so attention.dense never has one.
"""

from ..family import register
from .decoder import Decoder

QWEN2 = register(Decoder("qwen2", dense_bias=lambda cfg: False))
