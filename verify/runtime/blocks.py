"""The shared math of the decoder, written once per TP rank, with the tensors each block reads.

Every function takes per-rank hidden states ``xs`` and per-rank weights ``ws`` (parallel lists; ``w`` is one
rank's, scoped to its layer) and a ``Collectives`` for the cross-rank step, or works on one rank's tensor.
Each rank keeps its own copy of the residual stream and reads its own copy of replicated tensors, as the
engine does, so a replica that differs between rank files shows up. In float16 and bfloat16, values are rounded
to the dtype where TensorRT-LLM's kernels round them: ``numerics`` says where, with the upstream file for each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from shardproof.converter.transforms import ceil_div

from . import rotary
from .numerics import attend, linear, rotate
from .numerics import layer_norm as _layer_norm

if TYPE_CHECKING:
    from shardproof.converter.card import Shape

    from .collectives import Collectives
    from .config import RuntimeConfig
    from .rank_files import RankWeights

Rope = tuple[Tensor, Tensor]  # float32 cos, sin [T, head_size]

def swiglu(t: Tensor) -> Tensor:
    """TensorRT-LLM's swiglu: the last dim is [x; gate], the result silu(gate) * x."""
    x, gate = t.chunk(2, dim=-1)
    return F.silu(gate) * x


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # both names of the tanh approximation
               "swiglu": swiglu}
POSITION_EMBEDDING = "rope_gpt_neox"
LONG_ROPE = "long_rope"  # TensorRT-LLM's rotary with longrope factors in their own config fields
ROTARY_SCALING_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm with the statistics in float32, the normalized x rounded to the compute dtype, then scaled by
    ``weight`` in it (TensorRT-LLM's ``functional.rms_norm``, transformers' too)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def layer_norm(x: Tensor, w: RankWeights, name: str, eps: float) -> Tensor:
    """LayerNorm ``name`` (its ``.weight`` and ``.bias``), statistics and affine in float32, rounded once."""
    return _layer_norm(x, w[f"{name}.weight"], w[f"{name}.bias"], eps)


def layer_norm_tensors(name: str, cfg: RuntimeConfig) -> dict[str, Shape]:
    return {f"{name}.weight": (cfg.hidden_size,), f"{name}.bias": (cfg.hidden_size,)}


def rotary_cos_sin(cfg: RuntimeConfig, seq_len: int, device: torch.device | str) -> Rope:
    """float32 cos/sin tables [T, head_size] for rotary attention with the configured scaling, times its
    attention scaling, as transformers computes them (``rotary.inv_freq``)."""
    inv_freq, scaling = rotary.inv_freq(cfg.rotary_scaling, cfg.rotary_base, cfg.head_size,
                                        cfg.max_position_embeddings, seq_len)
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * scaling).to(device), (emb.sin() * scaling).to(device)


def attention_tensors(cfg: RuntimeConfig, dense_bias: bool) -> dict[str, Shape]:
    """One rank's attention tensors: fused qkv ``[q_r; k_r; v_r]``, optional q/k norms, row-parallel dense."""
    H, hd, nq, nkv = cfg.hidden_size, cfg.head_size, cfg.q_heads_per_rank, cfg.kv_heads_per_rank
    qkv_rows = (nq + 2 * nkv) * hd
    out = {"attention.qkv.weight": (qkv_rows, H), "attention.dense.weight": (H, nq * hd)}
    if cfg.attn_bias:
        out["attention.qkv.bias"] = (qkv_rows,)
    if dense_bias:
        out["attention.dense.bias"] = (H,)
    if cfg.qk_layernorm:
        out |= {"attention.q_layernorm.weight": (hd,), "attention.k_layernorm.weight": (hd,)}
    return out


def attention(h: Tensor, w: RankWeights, cfg: RuntimeConfig, rope: Rope | None) -> Tensor:
    """One rank's causal GQA attention of normed ``h`` through dense: a partial sum, before the all-reduce.
    ``rope`` None: no rotary embedding (positions were added to the embedding)."""
    B, T, _ = h.shape
    nq, nkv, hd = cfg.q_heads_per_rank, cfg.kv_heads_per_rank, cfg.head_size
    qkv = linear(h, w["attention.qkv.weight"], w["attention.qkv.bias"] if cfg.attn_bias else None)
    q, k, v = (t.reshape(B, T, -1, hd) for t in qkv.split([nq * hd, nkv * hd, nkv * hd], dim=-1))
    if cfg.qk_layernorm:  # per-head RMSNorm over head_size, before rotary
        q = rms_norm(q, w["attention.q_layernorm.weight"], cfg.norm_epsilon)
        k = rms_norm(k, w["attention.k_layernorm.weight"], cfg.norm_epsilon)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if rope is not None:
        q, k = rotate(q, *rope), rotate(k, *rope)
    k, v = k.repeat_interleave(nq // nkv, dim=1), v.repeat_interleave(nq // nkv, dim=1)
    o = attend(q, k, v)
    return linear(o.transpose(1, 2).reshape(B, T, nq * hd), w["attention.dense.weight"])


def gated_mlp_tensors(cfg: RuntimeConfig) -> dict[str, Shape]:
    """One rank's MLP tensors: column-parallel fc and gate, row-parallel proj."""
    H, ffn = cfg.hidden_size, cfg.intermediate_size // cfg.tp_size
    out = {"mlp.fc.weight": (ffn, H), "mlp.gate.weight": (ffn, H), "mlp.proj.weight": (H, ffn)}
    if cfg.mlp_bias:
        out |= {"mlp.fc.bias": (ffn,), "mlp.gate.bias": (ffn,), "mlp.proj.bias": (H,)}
    return out


def gated_mlp(h: Tensor, w: RankWeights, cfg: RuntimeConfig) -> Tensor:
    """One rank's proj(act(fc(h)) * gate(h)) of normed ``h``: a partial sum, before the all-reduce."""
    fc = linear(h, w["mlp.fc.weight"], w["mlp.fc.bias"] if cfg.mlp_bias else None)
    gate = linear(h, w["mlp.gate.weight"], w["mlp.gate.bias"] if cfg.mlp_bias else None)
    return linear(ACTIVATIONS[cfg.hidden_act](fc) * gate, w["mlp.proj.weight"])


def fused_mlp_tensors(cfg: RuntimeConfig) -> dict[str, Shape]:
    """One rank's fused gated MLP: column-parallel fc of both halves ``[x_r; gate_r]``, row-parallel proj."""
    H, ffn = cfg.hidden_size, cfg.intermediate_size // cfg.tp_size
    out = {"mlp.fc.weight": (2 * ffn, H), "mlp.proj.weight": (H, ffn)}
    if cfg.mlp_bias:
        out |= {"mlp.fc.bias": (2 * ffn,), "mlp.proj.bias": (H,)}
    return out


def mlp_tensors(cfg: RuntimeConfig) -> dict[str, Shape]:
    """One rank's plain MLP tensors: column-parallel fc, row-parallel proj."""
    H, ffn = cfg.hidden_size, cfg.intermediate_size // cfg.tp_size
    out = {"mlp.fc.weight": (ffn, H), "mlp.proj.weight": (H, ffn)}
    if cfg.mlp_bias:
        out |= {"mlp.fc.bias": (ffn,), "mlp.proj.bias": (H,)}
    return out


def mlp(h: Tensor, w: RankWeights, cfg: RuntimeConfig) -> Tensor:
    """One rank's proj(act(fc(h))) of normed ``h`` (a plain activation, or a gated one such as swiglu over a
    fused fc): a partial sum, before the all-reduce."""
    fc = linear(h, w["mlp.fc.weight"], w["mlp.fc.bias"] if cfg.mlp_bias else None)
    return linear(ACTIVATIONS[cfg.hidden_act](fc), w["mlp.proj.weight"])


def moe_tensors(cfg: RuntimeConfig) -> dict[str, Shape]:
    """One rank's MoE tensors: the whole router (float32), its experts' stacked fc ``[w3; w1]`` and proj, each
    expert split over the expert-TP ranks on the intermediate dim."""
    H, experts = cfg.hidden_size, cfg.num_experts // cfg.moe_ep_size
    ffn = cfg.intermediate_size // cfg.moe_tp_size
    return {"mlp.router.weight": (cfg.num_experts, H), "mlp.fc.weight": (experts, 2 * ffn, H),
            "mlp.proj.weight": (experts, H, ffn)}


MOE_FLOAT32 = ("mlp.router.weight",)  # kept in float32 whatever the checkpoint dtype


def moe(h: Tensor, w: RankWeights, cfg: RuntimeConfig) -> Tensor:
    """One rank's share of a top-k mixture of experts on normed ``h``: a partial sum, before the all-reduce.

    The router runs in float32 (input cast up, weight stored float32); softmax, top-k, and the top-k
    probabilities divided by their sum (normalization_mode 1, renormalize). The rank runs its experts
    ``[ep_rank * E_local, (ep_rank + 1) * E_local)`` on the tokens routed to them, each on its intermediate
    slice: ``proj(swiglu(fc(x)))``; the outputs times their routing weights are summed in float32 and rounded once.
    """
    x = h.reshape(-1, h.shape[-1])
    probs = F.softmax(F.linear(x.float(), w["mlp.router.weight"]), dim=-1)
    top, chosen = torch.topk(probs, cfg.top_k, dim=-1)
    top = top / top.sum(dim=-1, keepdim=True)
    fc, proj = w["mlp.fc.weight"], w["mlp.proj.weight"]
    first = (w.tp_rank % cfg.moe_ep_size) * fc.shape[0]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for j in range(fc.shape[0]):
        token, slot = torch.where(chosen == first + j)
        y = linear(swiglu(linear(x[token], fc[j])), proj[j])
        out.index_add_(0, token, y.float() * top[token, slot, None])
    return out.to(x.dtype).reshape(h.shape)


def row_parallel(parts: list[Tensor], ws: list[RankWeights], comm: Collectives, bias: str | None) -> list[Tensor]:
    """All-reduce the per-rank partial sums, then add the replicated ``bias`` tensor once, if named."""
    out = comm.all_reduce(parts)
    return out if bias is None else [o + w[bias] for o, w in zip(out, ws)]


def decoder_layer_tensors(cfg: RuntimeConfig, dense_bias: bool,
                          mlp_tensors: Callable[[RuntimeConfig], dict[str, Shape]] | None = None) -> dict[str, Shape]:
    """One rank's tensors of a pre-norm decoder layer (names relative to the layer); the MLP's are
    ``mlp_tensors(cfg)`` (default: the gated MLP's)."""
    H = cfg.hidden_size
    return {"input_layernorm.weight": (H,), **attention_tensors(cfg, dense_bias),
            "post_layernorm.weight": (H,), **(mlp_tensors or gated_mlp_tensors)(cfg)}


def decoder_layer(xs: list[Tensor], ws: list[RankWeights], cfg: RuntimeConfig, rope: Rope, comm: Collectives,
                  dense_bias: bool, mlp: Callable[[Tensor, RankWeights, RuntimeConfig], Tensor] | None = None
                  ) -> list[Tensor]:
    """x + dense(attn(norm(x))), then x + proj(mlp(norm(x))) with ``mlp`` (default: the gated MLP);
    row-parallel biases added once."""
    mlp = mlp or gated_mlp
    eps = cfg.norm_epsilon
    attn = row_parallel([attention(rms_norm(x, w["input_layernorm.weight"], eps), w, cfg, rope)
                         for x, w in zip(xs, ws)], ws, comm, "attention.dense.bias" if dense_bias else None)
    xs = [x + a for x, a in zip(xs, attn)]
    out = row_parallel([mlp(rms_norm(x, w["post_layernorm.weight"], eps), w, cfg) for x, w in zip(xs, ws)],
                       ws, comm, "mlp.proj.bias" if cfg.mlp_bias else None)
    return [x + m for x, m in zip(xs, out)]


VOCAB_EMBEDDING = "transformer.vocab_embedding.weight"
POSITION_EMBEDDING_TABLE = "transformer.position_embedding.weight"


def embedding_tensors(cfg: RuntimeConfig, name: str = VOCAB_EMBEDDING, rows: int | None = None) -> dict[str, Shape]:
    """A first-stage embedding table of ``rows`` rows (default: the vocabulary): whole, row-parallel (dim 0,
    padded to a multiple of tp) or hidden-parallel (dim 1), as the layout shards the embedding."""
    V, H, tp = rows or cfg.vocab_size, cfg.hidden_size, cfg.tp_size
    shape = ((V, H) if not cfg.use_parallel_embedding
             else (ceil_div(V, tp), H) if cfg.embedding_sharding_dim == 0 else (V, H // tp))
    return {name: shape}


def embedding(ids: Tensor, ws: list[RankWeights], cfg: RuntimeConfig, comm: Collectives,
              scale: float | None = None, name: str = VOCAB_EMBEDDING) -> list[Tensor]:
    """Lookup in embedding table ``name`` (default: the tokens'): replicated, vocab-parallel (masked lookup +
    all-reduce) or hidden-parallel (all-gather); then multiplied by ``scale`` in the compute dtype, if given."""
    if not cfg.use_parallel_embedding:
        xs = [w.rows(name, ids) for w in ws]
    elif cfg.embedding_sharding_dim == 1:
        xs = comm.all_gather([w.rows(name, ids) for w in ws], dim=-1)
    else:
        parts = []
        for w in ws:
            n = w.shape(name)[0]
            local = ids - w.tp_rank * n
            inside = (local >= 0) & (local < n)
            rows = w.rows(name, local.clamp(0, n - 1))
            parts.append(torch.where(inside.unsqueeze(-1), rows, torch.zeros((), dtype=rows.dtype, device=rows.device)))
        xs = comm.all_reduce(parts)
    return xs if scale is None else [x * torch.tensor(scale, dtype=x.dtype) for x in xs]


def positions(ids: Tensor) -> Tensor:
    """Position ids 0 .. T-1 for every sequence of token ids [B, T] (no padding, no past)."""
    return torch.arange(ids.shape[1], device=ids.device).expand_as(ids)


def lm_head_tensors(cfg: RuntimeConfig) -> dict[str, Shape]:
    """The last stage's final norm and vocab-parallel lm_head (zero-padded to tp * ceil(V / tp) rows); no
    lm_head when the embedding table is shared with it."""
    if cfg.share_embedding_table:
        return {"transformer.ln_f.weight": (cfg.hidden_size,)}
    return {"transformer.ln_f.weight": (cfg.hidden_size,), "lm_head.weight": (cfg.vocab_per_rank, cfg.hidden_size)}


def lm_logits(xs: list[Tensor], ws: list[RankWeights], cfg: RuntimeConfig, comm: Collectives) -> list[Tensor]:
    """ln_f then the vocab-parallel lm_head (or the shared embedding table), gathered over TP and cut to
    vocab_size, float32."""
    return lm_head([rms_norm(x, w["transformer.ln_f.weight"], cfg.norm_epsilon) for x, w in zip(xs, ws)], ws, cfg, comm)


def lm_head(hs: list[Tensor], ws: list[RankWeights], cfg: RuntimeConfig, comm: Collectives) -> list[Tensor]:
    """The vocab-parallel lm_head (or the shared embedding table) of final-normed ``hs``, gathered over TP and
    cut to vocab_size, float32."""
    head = VOCAB_EMBEDDING if cfg.share_embedding_table else "lm_head.weight"
    local = [linear(h, w[head]) for h, w in zip(hs, ws)]
    return [full[..., : cfg.vocab_size].float() for full in comm.all_gather(local, dim=-1)]
