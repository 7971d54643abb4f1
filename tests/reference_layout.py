"""An independent oracle: TensorRT-LLM's Llama-family and GPT-2 conversion rules written out literally, for tests.

It follows tensorrt_llm/models/llama/convert.py (`load_weights_from_hf_model`; Phi-3: models/phi3/convert.py;
Mixtral: the MoE branch of `convert_layer`) and convert_utils.py (`dup_kv_weight`, `split`, `pad_vocab_size`),
and models/gpt/convert.py (`split_qkv`, `split_embedding`) for GPT-2, step by step on whole tensors, sharing no
code with converter/,
so a wrong primitive in converter/sharding.py cannot agree with it by construction.
"""

from __future__ import annotations

import math

import torch


def dup_kv(v: torch.Tensor, num_kv: int, tp: int) -> torch.Tensor:
    reps = tp // num_kv
    head = v.shape[0] // num_kv
    rest = v.shape[1:]
    return v.reshape(num_kv, 1, head, *rest).expand(num_kv, reps, head, *rest).reshape(num_kv * reps * head, *rest)


def split(v: torch.Tensor, tp: int, rank: int, dim: int = 0) -> torch.Tensor:
    assert v.shape[dim] % tp == 0
    return v.split(v.shape[dim] // tp, dim=dim)[rank]


def pad_rows(v: torch.Tensor, tp: int) -> torch.Tensor:
    padded = math.ceil(v.shape[0] / tp) * tp
    return torch.nn.functional.pad(v, (0, 0, 0, padded - v.shape[0]))


# The families this oracle transcribes; Gemma's norms are stored as 1 + weight; Phi-3 fuses q/k/v and gate/up;
# GPT-2 has its own rules below.
ORACLE = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
          "Phi3ForCausalLM", "MixtralForCausalLM", "GPT2LMHeadModel"}
FORCED_EMBEDDING = {"GemmaForCausalLM"}  # its TensorRT-LLM config decides the embedding's sharding itself


def cast(name: str, tensor: torch.Tensor, dtype: torch.dtype, architecture: str) -> torch.Tensor:
    """The checkpoint value of one HF tensor: a cast, and for Gemma's norms `param + 1.0` in float32 first."""
    if architecture == "GemmaForCausalLM" and "norm" in name:
        return (tensor.float() + 1.0).to(dtype)
    return tensor.to(dtype)


def reassembled(name: str, tensor: torch.Tensor, dtype: torch.dtype, architecture: str) -> torch.Tensor:
    """What reassembly gives back: the cast (a router: float32); for Gemma's norms, 1 + w rounds in dtype, so w
    comes back rounded."""
    if architecture == "GemmaForCausalLM" and "norm" in name:
        return (cast(name, tensor, dtype, architecture).float() - 1.0).to(dtype)
    if name.endswith("block_sparse_moe.gate.weight"):  # the router is stored in float32
        return tensor.to(torch.float32)
    return tensor.to(dtype)


def moe_layer(hf: dict[str, torch.Tensor], p: str, cfg: dict, dtype: torch.dtype, tp: int, tp_rank: int,
              moe_tp: int, moe_ep: int) -> dict[str, torch.Tensor]:
    """The MoE branch of `convert_layer`: experts of `Mapping.ep_experts` stacked, w1/w3 split on dim 1 and w2
    on dim 2 over moe_tp, fc = concat([w3, w1], dim=-2); the router `get_weight(..., torch.float32)`, unsplit."""
    moe_tp_rank, moe_ep_rank = tp_rank // moe_ep, tp_rank % moe_ep  # Mapping.moe_tp_rank / moe_ep_rank
    per_rank = cfg["num_local_experts"] // moe_ep
    rank_experts = range(moe_ep_rank * per_rank, (moe_ep_rank + 1) * per_rank)
    stacked = {s: torch.stack([hf[p + f"block_sparse_moe.experts.{e}.{s}.weight"] for e in rank_experts])
               for s in ("w1", "w2", "w3")}
    w1, w3 = split(stacked["w1"], moe_tp, moe_tp_rank, dim=1), split(stacked["w3"], moe_tp, moe_tp_rank, dim=1)
    w2 = split(stacked["w2"], moe_tp, moe_tp_rank, dim=2)
    return {"mlp.fc.weight": torch.concat([w3, w1], dim=-2).to(dtype), "mlp.proj.weight": w2.to(dtype),
            "mlp.router.weight": hf[p + "block_sparse_moe.gate.weight"].to(torch.float32)}


def expected_ranks(
    hf: dict[str, torch.Tensor], cfg: dict, dtype: torch.dtype, tp: int, pp: int,
    parallel_embedding: bool = False, sharding_dim: int = 0, moe_tp: int | None = None, moe_ep: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Every rank's tensors as TensorRT-LLM's rules make them, from the HF tensors and HF config dict.

    Gemma (models/gemma/config.py): GemmaConfig forces use_parallel_embedding = tp > 1 whatever is asked, and
    shares the embedding table with lm_head, so no lm_head is stored (with pp > 1 the last stage has no
    embedding, so it gets the padded, split embedding as lm_head). Mixtral: `moe_layer` in place of the MLP,
    with Mapping's defaults (moe_tp = tp, moe_ep = 1; one given, the other is tp divided by it).
    """
    architecture = cfg["architectures"][0]
    if architecture == "GPT2LMHeadModel":
        return expected_gpt2_ranks(hf, cfg, dtype, tp, pp, parallel_embedding, sharding_dim)
    share = False
    if architecture in FORCED_EMBEDDING:
        parallel_embedding, sharding_dim, share = tp > 1, 0, pp == 1
    if moe_tp is None and moe_ep is None:
        moe_tp, moe_ep = tp, 1
    elif moe_tp is None:
        moe_tp = tp // moe_ep
    elif moe_ep is None:
        moe_ep = tp // moe_tp
    raw = hf
    hf = {k: cast(k, v, dtype, architecture) for k, v in hf.items()}
    layers = cfg["num_hidden_layers"]
    num_kv = cfg["num_key_value_heads"]
    out = []
    for rank in range(tp * pp):
        tp_rank, pp_rank = rank % tp, rank // tp
        stage = torch.tensor_split(torch.arange(layers), pp)[pp_rank].tolist()
        w = {}
        for local, layer in enumerate(stage):
            p, t = f"model.layers.{layer}.", f"transformer.layers.{local}."
            for kind in ("weight", "bias"):
                if p + f"self_attn.qkv_proj.{kind}" in hf:  # Phi-3: rows [q; k; v] by heads
                    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
                    q_rows = cfg["num_attention_heads"] * head_dim
                    fused = hf[p + f"self_attn.qkv_proj.{kind}"]
                    q, k, v = fused[:q_rows], fused[q_rows:q_rows + num_kv * head_dim], fused[q_rows + num_kv * head_dim:]
                elif p + f"self_attn.q_proj.{kind}" in hf:
                    q, k, v = (hf[p + f"self_attn.{n}_proj.{kind}"] for n in "qkv")
                else:
                    continue
                if num_kv < tp:
                    k, v = dup_kv(k, num_kv, tp), dup_kv(v, num_kv, tp)
                w[t + f"attention.qkv.{kind}"] = torch.cat([split(q, tp, tp_rank), split(k, tp, tp_rank), split(v, tp, tp_rank)])
            w[t + "attention.dense.weight"] = split(hf[p + "self_attn.o_proj.weight"], tp, tp_rank, dim=1)
            if p + "self_attn.o_proj.bias" in hf:
                w[t + "attention.dense.bias"] = hf[p + "self_attn.o_proj.bias"]
            for norm, name in (("q_norm", "q_layernorm"), ("k_norm", "k_layernorm")):
                if p + f"self_attn.{norm}.weight" in hf:
                    w[t + f"attention.{name}.weight"] = hf[p + f"self_attn.{norm}.weight"]
            if p + "mlp.gate_up_proj.weight" in hf:
                # models/phi3/convert.py swaps the halves to [up; gate] (swiglu(t) = silu(t[half:]) * t[:half]);
                # each rank needs its own [up_r; gate_r] for that to hold per rank.
                gate, up = hf[p + "mlp.gate_up_proj.weight"].chunk(2)
                w[t + "mlp.fc.weight"] = torch.cat([split(up, tp, tp_rank), split(gate, tp, tp_rank)])
            if architecture == "MixtralForCausalLM":
                moe = moe_layer(raw, p, cfg, dtype, tp, tp_rank, moe_tp, moe_ep)
                w.update({t + name: value for name, value in moe.items()})
            for hf_name, trt_name in (("gate_proj", "fc"), ("up_proj", "gate")):
                if p + f"mlp.{hf_name}.weight" not in hf:
                    continue
                w[t + f"mlp.{trt_name}.weight"] = split(hf[p + f"mlp.{hf_name}.weight"], tp, tp_rank)
                if p + f"mlp.{hf_name}.bias" in hf:
                    w[t + f"mlp.{trt_name}.bias"] = split(hf[p + f"mlp.{hf_name}.bias"], tp, tp_rank)
            if p + "mlp.down_proj.weight" in hf:
                w[t + "mlp.proj.weight"] = split(hf[p + "mlp.down_proj.weight"], tp, tp_rank, dim=1)
            if p + "mlp.down_proj.bias" in hf:
                w[t + "mlp.proj.bias"] = hf[p + "mlp.down_proj.bias"]
            w[t + "input_layernorm.weight"] = hf[p + "input_layernorm.weight"]
            w[t + "post_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
        embedding = hf["model.embed_tokens.weight"]
        if pp_rank == pp - 1:
            if not share:
                head = embedding if cfg.get("tie_word_embeddings") else hf["lm_head.weight"]
                w["lm_head.weight"] = split(pad_rows(head, tp), tp, tp_rank)
            w["transformer.ln_f.weight"] = hf["model.norm.weight"]
        if pp_rank == 0:
            if parallel_embedding:
                embedding = split(pad_rows(embedding, tp) if sharding_dim == 0 else embedding, tp, tp_rank, dim=sharding_dim)
            w["transformer.vocab_embedding.weight"] = embedding
        out.append(w)
    return out


def split_qkv(v: torch.Tensor, tp: int, rank: int, hidden: int) -> torch.Tensor:
    """models/gpt/convert.py `split_qkv` for multi-head attention: q, k, v rows of `hidden` each, each split."""
    q, k, w = torch.split(v, [hidden, hidden, hidden], dim=0)
    return torch.cat([split(q, tp, rank), split(k, tp, rank), split(w, tp, rank)], dim=0)


def split_embedding(v: torch.Tensor, tp: int, rank: int, parallel: bool, sharding_dim: int) -> torch.Tensor:
    """models/gpt/convert.py `split_embedding`: whole, or rows padded to a multiple of tp then split, or columns."""
    if not parallel:
        return v
    return split(pad_rows(v, tp) if sharding_dim == 0 else v, tp, rank, dim=sharding_dim)


def expected_gpt2_ranks(
    hf: dict[str, torch.Tensor], cfg: dict, dtype: torch.dtype, tp: int, pp: int,
    parallel_embedding: bool, sharding_dim: int,
) -> list[dict[str, torch.Tensor]]:
    """models/gpt/convert.py `load_weights_from_hf_model`, gpt_variant "gpt2": Conv1D weights transposed
    (`.t()`), c_attn through `split_qkv`, dense and proj split on dim 1 with whole biases, fc and its bias on
    dim 0, ln weights and biases whole; wte and wpe through `split_embedding` on the first stage; lm_head the
    padded, split wte on the last (HF's own lm_head.weight when the config unties it: see docs/format.md)."""
    hf = {k: v.to(dtype) for k, v in hf.items()}
    hidden, layers = cfg["n_embd"], cfg["n_layer"]
    out = []
    for rank in range(tp * pp):
        tp_rank, pp_rank = rank % tp, rank // tp
        stage = torch.tensor_split(torch.arange(layers), pp)[pp_rank].tolist()
        w = {}
        for local, layer in enumerate(stage):
            p, t = f"transformer.h.{layer}.", f"transformer.layers.{local}."
            w[t + "attention.qkv.weight"] = split_qkv(hf[p + "attn.c_attn.weight"].t(), tp, tp_rank, hidden)
            w[t + "attention.qkv.bias"] = split_qkv(hf[p + "attn.c_attn.bias"], tp, tp_rank, hidden)
            w[t + "attention.dense.weight"] = split(hf[p + "attn.c_proj.weight"].t(), tp, tp_rank, dim=1)
            w[t + "attention.dense.bias"] = hf[p + "attn.c_proj.bias"]
            w[t + "mlp.fc.weight"] = split(hf[p + "mlp.c_fc.weight"].t(), tp, tp_rank)
            w[t + "mlp.fc.bias"] = split(hf[p + "mlp.c_fc.bias"], tp, tp_rank)
            w[t + "mlp.proj.weight"] = split(hf[p + "mlp.c_proj.weight"].t(), tp, tp_rank, dim=1)
            w[t + "mlp.proj.bias"] = hf[p + "mlp.c_proj.bias"]
            for hf_norm, trt_norm in (("ln_1", "input_layernorm"), ("ln_2", "post_layernorm")):
                w[t + f"{trt_norm}.weight"] = hf[p + f"{hf_norm}.weight"]
                w[t + f"{trt_norm}.bias"] = hf[p + f"{hf_norm}.bias"]
        if pp_rank == 0:
            for hf_name, trt_name in (("wte", "vocab_embedding"), ("wpe", "position_embedding")):
                w[f"transformer.{trt_name}.weight"] = split_embedding(
                    hf[f"transformer.{hf_name}.weight"], tp, tp_rank, parallel_embedding, sharding_dim)
        if pp_rank == pp - 1:
            head = hf["transformer.wte.weight"] if cfg.get("tie_word_embeddings", True) else hf["lm_head.weight"]
            w["lm_head.weight"] = split(pad_rows(head, tp), tp, tp_rank)
            w["transformer.ln_f.weight"] = hf["transformer.ln_f.weight"]
            w["transformer.ln_f.bias"] = hf["transformer.ln_f.bias"]
        out.append(w)
    return out
