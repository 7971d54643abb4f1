"""mixtral: TensorRT-LLM's LLaMAForCausalLM with a MoE config (models/llama/model.py, layers/moe.py).

    x = embed(ids)
    for each layer:  x = x + dense(attention(rms_norm(x)))
                     x = x + moe(rms_norm(x))   (each rank: its experts on its intermediate slice; all-reduced)
    logits = lm_head(rms_norm(x)), all-gathered over TP, float32

No biases (Mixtral has none); the router is stored and run in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from shardproof.converter.card import Shape

from ..blocks import (MOE_FLOAT32, POSITION_EMBEDDING, Rope, attention, attention_tensors, embedding, embedding_tensors, lm_head_tensors,
                      lm_logits, moe, moe_tensors, rms_norm, row_parallel)
from ..collectives import Collectives
from ..config import RuntimeConfig
from ..family import register
from ..rank_files import RankWeights, rank_tensors


class Mixtral:
    """A ``Family`` whose forward executes experts (``moe``) and keeps the router in float32 (``dtypes``)."""

    name = "mixtral"
    moe = True
    position_embedding_type = POSITION_EMBEDDING

    def layer_tensors(self, cfg: RuntimeConfig) -> dict[str, Shape]:
        H = cfg.hidden_size
        return {"input_layernorm.weight": (H,), **attention_tensors(cfg, dense_bias=False),
                "post_layernorm.weight": (H,), **moe_tensors(cfg)}

    def tensors(self, cfg: RuntimeConfig, rank: int) -> dict[str, Shape]:
        return rank_tensors(cfg, rank, first=embedding_tensors(cfg), layer=self.layer_tensors(cfg),
                            last=lm_head_tensors(cfg))

    def dtypes(self, cfg: RuntimeConfig, rank: int) -> dict[str, torch.dtype]:
        return {name: torch.float32 for name in self.tensors(cfg, rank) if name.endswith(MOE_FLOAT32)}

    def embed(self, ids: Tensor, ws: list[RankWeights], cfg: RuntimeConfig, comm: Collectives) -> list[Tensor]:
        return embedding(ids, ws, cfg, comm)

    def layer(self, xs: list[Tensor], ws: list[RankWeights], cfg: RuntimeConfig, rope: Rope,
              comm: Collectives) -> list[Tensor]:
        eps = cfg.norm_epsilon
        attn = row_parallel([attention(rms_norm(x, w["input_layernorm.weight"], eps), w, cfg, rope)
                             for x, w in zip(xs, ws)], ws, comm, None)
        xs = [x + a for x, a in zip(xs, attn)]
        experts = row_parallel([moe(rms_norm(x, w["post_layernorm.weight"], eps), w, cfg) for x, w in zip(xs, ws)],
                               ws, comm, None)
        return [x + e for x, e in zip(xs, experts)]

    def logits(self, xs: list[Tensor], ws: list[RankWeights], cfg: RuntimeConfig, comm: Collectives) -> list[Tensor]:
        return lm_logits(xs, ws, cfg, comm)


MIXTRAL = register(Mixtral())
