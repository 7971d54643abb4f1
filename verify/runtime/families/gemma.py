"""gemma: TensorRT-LLM's GemmaForCausalLM (models/gemma/model.py).

The checkpoint stores the embedding unscaled; the forward multiplies it by sqrt(hidden_size) in the compute
dtype. Norm weights are stored as 1 + weight, so the shared RMSNorm applies them unchanged; hidden_act
(gelu_pytorch_tanh) comes from the config; dense has a bias exactly when attn_bias.
"""

from ..family import register
from .decoder import Decoder

GEMMA = register(Decoder("gemma", dense_bias=lambda cfg: cfg.attn_bias,
                         embedding_scale=lambda cfg: cfg.hidden_size**0.5))
