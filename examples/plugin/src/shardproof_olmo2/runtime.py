"""The sharded runtime's `olmo2` forward: what a TensorRT-LLM engine for the OLMo2 card's checkpoint computes, per
TP rank, built from shardproof's shared blocks.

    x = embed(ids)
    for each layer:  x = x + post_attention_layernorm(dense(attention(x)))    q, k normed over all heads
                     x = x + post_feedforward_layernorm(proj(silu(fc(x)) * gate(x)))
    logits = lm_head(ln_f(x))

Each rank holds its own heads of q and k; the RMS statistic of q_norm / k_norm covers all heads, so the sums of
squares are all-reduced over the TP ranks (a KV head replicated on several ranks counted once). The norms
multiply in float32 and cast once, as transformers' Olmo2RMSNorm does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from shardproof.verify.runtime.blocks import (Rope, attention_tensors, embedding_tensors, gated_mlp, gated_mlp_tensors,
                                              lm_head, lm_head_tensors, row_parallel)
from shardproof.verify.runtime.collectives import Collectives
from shardproof.verify.runtime.config import RuntimeConfig
from shardproof.verify.runtime.family import register
from shardproof.verify.runtime.numerics import attend, linear, rotate
from shardproof.verify.runtime.families.decoder import Decoder
from shardproof.verify.runtime.rank_files import RankWeights, rank_tensors


def rms_norm(x: Tensor, weight: Tensor, eps: float, mean_square: Tensor | None = None) -> Tensor:
    """Olmo2RMSNorm: (weight * x / rms(x)) in float32, cast once; `mean_square` given when x is one rank's part."""
    xf = x.float()
    ms = xf.pow(2).mean(-1, keepdim=True) if mean_square is None else mean_square
    return (weight.float() * (xf * torch.rsqrt(ms + eps))).to(x.dtype)


def _kv_head_range(cfg: RuntimeConfig, tp_rank: int) -> range:
    """The KV heads rank `tp_rank` holds (one replicated head when tp > KV heads)."""
    if cfg.num_kv_heads >= cfg.tp_size:
        n = cfg.num_kv_heads // cfg.tp_size
        return range(tp_rank * n, (tp_rank + 1) * n)
    head = tp_rank // (cfg.tp_size // cfg.num_kv_heads)
    return range(head, head + 1)


def _normed(parts: list[Tensor], ws: list[RankWeights], name: str, heads: list[range], total: int,
            replicas: int, cfg: RuntimeConfig, comm: Collectives) -> list[Tensor]:
    """Each rank's q (or k) part [B, T, heads_r * hd] normed over the whole projection of `total` elements."""
    hd = cfg.head_size
    sums = comm.all_reduce([p.float().pow(2).sum(-1, keepdim=True) for p in parts])
    out = []
    for p, w, s, h in zip(parts, ws, sums, heads):
        weight = w[name][h.start * hd : h.stop * hd]
        out.append(rms_norm(p, weight, cfg.norm_epsilon, s / replicas / total))
    return out


@dataclass(frozen=True)
class Olmo2Decoder(Decoder):
    def tensors(self, cfg: RuntimeConfig, rank: int) -> dict[str, tuple[int, ...]]:
        H, hd = cfg.hidden_size, cfg.head_size
        attention = attention_tensors(cfg, dense_bias=cfg.attn_bias) | {
            "attention.q_layernorm.weight": (cfg.num_heads * hd,),
            "attention.k_layernorm.weight": (cfg.num_kv_heads * hd,)}
        layer = {**attention, "post_attention_layernorm.weight": (H,), **gated_mlp_tensors(cfg),
                 "post_feedforward_layernorm.weight": (H,)}
        return rank_tensors(cfg, rank, first=embedding_tensors(cfg), layer=layer, last=lm_head_tensors(cfg))

    def layer(self, xs: list[Tensor], ws: list[RankWeights], cfg: RuntimeConfig, rope: Rope,
              comm: Collectives) -> list[Tensor]:
        B, T, _ = xs[0].shape
        nq, nkv, hd = cfg.q_heads_per_rank, cfg.kv_heads_per_rank, cfg.head_size
        qkv = [linear(x, w["attention.qkv.weight"], w["attention.qkv.bias"] if cfg.attn_bias else None)
               for x, w in zip(xs, ws)]
        qs, ks, vs = zip(*(t.split([nq * hd, nkv * hd, nkv * hd], dim=-1) for t in qkv))
        q_heads = [range(w.tp_rank * nq, (w.tp_rank + 1) * nq) for w in ws]
        kv_heads = [_kv_head_range(cfg, w.tp_rank) for w in ws]
        replicas = max(cfg.tp_size // cfg.num_kv_heads, 1)
        qs = _normed(list(qs), ws, "attention.q_layernorm.weight", q_heads, cfg.num_heads * hd, 1, cfg, comm)
        ks = _normed(list(ks), ws, "attention.k_layernorm.weight", kv_heads, cfg.num_kv_heads * hd, replicas, cfg, comm)
        parts = []
        for q, k, v, w in zip(qs, ks, vs, ws):
            q, k, v = (t.reshape(B, T, -1, hd).transpose(1, 2) for t in (q, k, v))
            q, k = rotate(q, *rope), rotate(k, *rope)
            k, v = k.repeat_interleave(nq // nkv, dim=1), v.repeat_interleave(nq // nkv, dim=1)
            o = attend(q, k, v)
            parts.append(linear(o.transpose(1, 2).reshape(B, T, nq * hd), w["attention.dense.weight"]))
        attn = row_parallel(parts, ws, comm, "attention.dense.bias" if cfg.attn_bias else None)
        eps = cfg.norm_epsilon
        xs = [x + rms_norm(a, w["post_attention_layernorm.weight"], eps) for x, a, w in zip(xs, attn, ws)]
        mlp = row_parallel([gated_mlp(x, w, cfg) for x, w in zip(xs, ws)], ws, comm, None)
        return [x + rms_norm(m, w["post_feedforward_layernorm.weight"], eps) for x, m, w in zip(xs, mlp, ws)]

    def logits(self, xs: list[Tensor], ws: list[RankWeights], cfg: RuntimeConfig, comm: Collectives) -> list[Tensor]:
        return lm_head([rms_norm(x, w["transformer.ln_f.weight"], cfg.norm_epsilon) for x, w in zip(xs, ws)], ws, cfg, comm)


OLMO2 = register(Olmo2Decoder("olmo2", dense_bias=lambda cfg: cfg.attn_bias))
