"""The pre-norm rotary decoder with a gated MLP that the Llama-style families run; each picks its switches.

    x = embed(ids) [* embedding_scale]
    for each layer:  x = x + dense(attention(rms_norm(x)))     [+ dense bias once, after the all-reduce]
                     x = x + proj(act(fc(h)) * gate(h)), h = rms_norm(x)   [+ proj bias once]
    logits = lm_head(rms_norm(x)), all-gathered over TP, float32
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from shardproof.converter.card import Shape

from ..blocks import (POSITION_EMBEDDING, Rope, decoder_layer, decoder_layer_tensors, embedding, embedding_tensors, lm_head_tensors,
                      lm_logits)
from ..collectives import Collectives
from ..config import RuntimeConfig
from ..rank_files import RankWeights, rank_tensors


@dataclass(frozen=True)
class Decoder:
    """A ``Family``: ``dense_bias(cfg)`` says whether attention.dense has a bias, ``embedding_scale(cfg)``
    (if set) what the embedding is multiplied by."""

    name: str
    dense_bias: Callable[[RuntimeConfig], bool]
    embedding_scale: Callable[[RuntimeConfig], float] | None = None
    position_embedding_type: str = POSITION_EMBEDDING

    def tensors(self, cfg: RuntimeConfig, rank: int) -> dict[str, Shape]:
        return rank_tensors(cfg, rank, first=embedding_tensors(cfg),
                            layer=decoder_layer_tensors(cfg, self.dense_bias(cfg)), last=lm_head_tensors(cfg))

    def embed(self, ids: Tensor, ws: list[RankWeights], cfg: RuntimeConfig, comm: Collectives) -> list[Tensor]:
        return embedding(ids, ws, cfg, comm, self.embedding_scale(cfg) if self.embedding_scale else None)

    def layer(self, xs: list[Tensor], ws: list[RankWeights], cfg: RuntimeConfig, rope: Rope,
              comm: Collectives) -> list[Tensor]:
        return decoder_layer(xs, ws, cfg, rope, comm, self.dense_bias(cfg))

    def logits(self, xs: list[Tensor], ws: list[RankWeights], cfg: RuntimeConfig, comm: Collectives) -> list[Tensor]:
        return lm_logits(xs, ws, cfg, comm)
