"""phi3: TensorRT-LLM's Phi3ForCausalLM (models/phi3/model.py) for the dense Phi-3 models.

A pre-norm decoder whose MLP is TensorRT-LLM's `MLP` with hidden_act swiglu: one column-parallel fc holding
[up_r; gate_r] per rank, proj(silu(gate) * up); no biases. Rotary from the config (long_rope included).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from shardproof.converter.card import Shape

from ..blocks import (Rope, decoder_layer, decoder_layer_tensors, embedding_tensors, fused_mlp_tensors, mlp,
                      lm_head_tensors)
from ..collectives import Collectives
from ..config import RuntimeConfig
from ..family import register
from ..rank_files import RankWeights, rank_tensors
from .decoder import Decoder


@dataclass(frozen=True)
class FusedMLPDecoder(Decoder):
    """The shared decoder with the fused gated MLP in place of fc/gate."""

    def tensors(self, cfg: RuntimeConfig, rank: int) -> dict[str, Shape]:
        layer = decoder_layer_tensors(cfg, self.dense_bias(cfg), mlp_tensors=fused_mlp_tensors)
        return rank_tensors(cfg, rank, first=embedding_tensors(cfg), layer=layer, last=lm_head_tensors(cfg))

    def layer(self, xs: list[Tensor], ws: list[RankWeights], cfg: RuntimeConfig, rope: Rope,
              comm: Collectives) -> list[Tensor]:
        return decoder_layer(xs, ws, cfg, rope, comm, self.dense_bias(cfg), mlp=mlp)


PHI3 = register(FusedMLPDecoder("phi3", dense_bias=lambda cfg: False))
