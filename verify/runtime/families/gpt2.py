"""gpt2: TensorRT-LLM's GPTForCausalLM for gpt_variant gpt2 (models/gpt/model.py).

    x = vocab_embedding(ids) + position_embedding(0 .. T-1)
    for each layer:  x = x + dense(attention(layer_norm(x)))       no rotary; dense bias once, after the all-reduce
                     x = x + proj(act(fc(layer_norm(x))))           plain MLP; proj bias once, after the all-reduce
    logits = lm_head(layer_norm(x)), all-gathered over TP, float32

LayerNorms carry a bias; every linear has one (``bias: true`` in config.json); hidden_act comes from the config
(gelu_new, the tanh approximation).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from shardproof.converter.card import Shape

from ..blocks import (POSITION_EMBEDDING_TABLE, Rope, attention, attention_tensors, embedding, embedding_tensors,
                      layer_norm, layer_norm_tensors, lm_head, lm_head_tensors, mlp, mlp_tensors, positions,
                      row_parallel)
from ..collectives import Collectives
from ..config import RuntimeConfig
from ..family import register
from ..rank_files import RankWeights, rank_tensors

LN_F = "transformer.ln_f"


@dataclass(frozen=True)
class GPT:
    """A ``Family``: pre-LayerNorm decoder with learned absolute positions and a plain MLP."""

    name: str
    position_embedding_type: str = "learned_absolute"

    def tensors(self, cfg: RuntimeConfig, rank: int) -> dict[str, Shape]:
        first = {**embedding_tensors(cfg),
                 **embedding_tensors(cfg, POSITION_EMBEDDING_TABLE, cfg.max_position_embeddings)}
        layer = {**layer_norm_tensors("input_layernorm", cfg), **attention_tensors(cfg, dense_bias=cfg.attn_bias),
                 **layer_norm_tensors("post_layernorm", cfg), **mlp_tensors(cfg)}
        return rank_tensors(cfg, rank, first=first, layer=layer,
                            last={**layer_norm_tensors(LN_F, cfg), **lm_head_tensors(cfg)})

    def embed(self, ids: Tensor, ws: list[RankWeights], cfg: RuntimeConfig, comm: Collectives) -> list[Tensor]:
        tokens = embedding(ids, ws, cfg, comm)
        places = embedding(positions(ids), ws, cfg, comm, name=POSITION_EMBEDDING_TABLE)
        return [t + p for t, p in zip(tokens, places)]

    def layer(self, xs: list[Tensor], ws: list[RankWeights], cfg: RuntimeConfig, rope: Rope,
              comm: Collectives) -> list[Tensor]:
        eps = cfg.norm_epsilon
        attn = row_parallel([attention(layer_norm(x, w, "input_layernorm", eps), w, cfg, None)
                             for x, w in zip(xs, ws)], ws, comm, "attention.dense.bias" if cfg.attn_bias else None)
        xs = [x + a for x, a in zip(xs, attn)]
        out = row_parallel([mlp(layer_norm(x, w, "post_layernorm", eps), w, cfg) for x, w in zip(xs, ws)],
                           ws, comm, "mlp.proj.bias" if cfg.mlp_bias else None)
        return [x + m for x, m in zip(xs, out)]

    def logits(self, xs: list[Tensor], ws: list[RankWeights], cfg: RuntimeConfig, comm: Collectives) -> list[Tensor]:
        return lm_head([layer_norm(x, w, LN_F, cfg.norm_epsilon) for x, w in zip(xs, ws)], ws, cfg, comm)


GPT2 = register(GPT("gpt2"))
