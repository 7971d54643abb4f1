"""``config.json`` of a TensorRT-LLM checkpoint as the runtime reads it: generic fields, checked.

A fault of the file (bad JSON, a missing key, sizes the mapping cannot split) raises ``ValueError``; a valid
file asking for a feature the runtime does not execute (quantization, MoE for a family whose forward has no
experts, another MoE normalization, context parallelism, a position embedding its family forward does not
declare, an activation or rotary scaling, a rotary scaling TensorRT-LLM computes otherwise than the model:
``rotary.unexecutable``) raises ``CheckNotRun``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from shardproof.converter.card import get_card
from shardproof.converter.errors import CheckNotRun, ShardproofError
from shardproof.converter.transforms import ceil_div

from . import rotary
from .blocks import ACTIVATIONS, LONG_ROPE, POSITION_EMBEDDING, ROTARY_SCALING_TYPES
from .family import get_family

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class RuntimeConfig:
    """The fields of ``config.json`` that the runtime uses, checked."""

    architecture: str
    forward: str  # the family forward that executes ``architecture`` (its card's ``forward``)
    dtype: torch.dtype
    hidden_act: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    intermediate_size: int
    max_position_embeddings: int
    norm_epsilon: float
    rotary_base: float
    rotary_scaling: dict[str, Any] | None
    attn_bias: bool
    mlp_bias: bool
    qk_layernorm: bool
    use_parallel_embedding: bool
    embedding_sharding_dim: int
    share_embedding_table: bool  # lm_head is the (vocab-parallel) embedding table; only with pp_size 1
    tp_size: int
    pp_size: int
    num_experts: int = 0  # 0: a dense MLP; else the ``moe`` block's experts, top_k of them per token
    top_k: int = 0
    moe_tp_size: int = 1
    moe_ep_size: int = 1

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def q_heads_per_rank(self) -> int:
        return self.num_heads // self.tp_size

    @property
    def kv_heads_per_rank(self) -> int:
        return max(self.num_kv_heads // self.tp_size, 1)

    @property
    def vocab_per_rank(self) -> int:
        """Rows of a vocab-parallel shard: ceil(V / tp) (the last shard is zero-padded)."""
        return ceil_div(self.vocab_size, self.tp_size)

    def stage_layers(self, pp_rank: int) -> list[int]:
        """Global indices of the layers held by stage ``pp_rank`` (first stages take extras)."""
        return torch.tensor_split(torch.arange(self.num_layers), self.pp_size)[pp_rank].tolist()


def load_config(path: Path) -> RuntimeConfig:
    """Parse and check ``config.json``: ``ValueError("<path>: <problem>")`` for a fault of the file,
    then ``CheckNotRun("<path>: <feature>")`` for a feature the runtime does not execute."""

    def bad(problem: str) -> ValueError:
        return ValueError(f"{path}: {problem}")

    if not path.is_file():
        raise bad("missing config.json")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise bad("top level is not a JSON object")

    def need(key: str, where: dict = raw) -> Any:
        if key not in where:
            raise bad(f"missing key '{key}'")
        return where[key]

    arch, dtype = need("architecture"), need("dtype")
    try:
        forward = get_card(arch).forward
    except ShardproofError as e:  # not supported, or a plugin that registers architectures failed to load
        raise bad(str(e)) from None
    if dtype not in DTYPES:
        raise bad(f"unsupported dtype {dtype!r} (supported: {sorted(DTYPES)})")
    mapping = need("mapping")
    if not isinstance(mapping, dict):
        raise bad("'mapping' is not an object")
    scaling = raw.get("rotary_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise bad(f"rotary_scaling {scaling!r} is not an object")
    quant = raw.get("quantization") or {}
    if not isinstance(quant, dict):
        raise bad("'quantization' is not an object")

    if raw.get("position_embedding_type") == LONG_ROPE:
        scaling = longrope_scaling(raw, bad)
    kind = "default" if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind is None:
        raise bad(f"rotary_scaling {scaling!r} names no rope_type")

    moe = raw.get("moe") or {}
    if not isinstance(moe, dict):
        raise bad("'moe' is not an object")
    num_experts = int(moe.get("num_experts", 0))
    # a family declares that its forward executes experts (``Family.moe``)
    family_moe = bool(num_experts) and getattr(get_family(forward), "moe", False)

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    cfg = RuntimeConfig(
        architecture=arch,
        forward=forward,
        dtype=DTYPES[dtype],
        hidden_act=need("hidden_act"),
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_size=int(raw.get("head_size") or hidden // heads),
        intermediate_size=int(need("intermediate_size")),
        max_position_embeddings=int(need("max_position_embeddings")),
        norm_epsilon=float(need("norm_epsilon")),
        rotary_base=float(raw.get("rotary_base", 10000.0)),
        rotary_scaling=None if kind == "default" else {**scaling, "rope_type": kind},
        attn_bias=bool(raw.get("attn_bias", raw.get("bias", False))),  # GPTConfig: one `bias` for every linear
        mlp_bias=bool(raw.get("mlp_bias", raw.get("bias", False))),
        qk_layernorm=bool(raw.get("qk_layernorm", False)),
        use_parallel_embedding=bool(raw.get("use_parallel_embedding", False)),
        embedding_sharding_dim=int(raw.get("embedding_sharding_dim", 0)),
        share_embedding_table=bool(raw.get("share_embedding_table", False)) and int(need("pp_size", mapping)) == 1,
        tp_size=int(need("tp_size", mapping)),
        pp_size=int(need("pp_size", mapping)),
        num_experts=num_experts,
        top_k=int(moe.get("top_k", 0)),
        moe_tp_size=int(mapping.get("moe_tp_size", need("tp_size", mapping))),
        moe_ep_size=int(mapping.get("moe_ep_size", 1)),
    )
    tp, pp = cfg.tp_size, cfg.pp_size
    checks = [
        (tp >= 1 and pp >= 1, f"tp_size={tp}, pp_size={pp} must be >= 1"),
        (int(mapping.get("world_size", tp * pp)) == tp * pp,
         f"mapping.world_size={mapping.get('world_size')} != tp_size*pp_size={tp * pp}"),
        (cfg.num_layers >= pp, f"num_hidden_layers={cfg.num_layers} < pp_size={pp}"),
        (cfg.num_heads % tp == 0, f"num_attention_heads={cfg.num_heads} not divisible by tp={tp}"),
        (cfg.num_kv_heads % tp == 0 or tp % cfg.num_kv_heads == 0,
         f"num_key_value_heads={cfg.num_kv_heads} and tp={tp}: neither divides the other"),
        (cfg.num_heads % cfg.num_kv_heads == 0,
         f"num_attention_heads={cfg.num_heads} not a multiple of num_key_value_heads"),
        (num_experts or cfg.intermediate_size % tp == 0, f"intermediate_size not divisible by tp={tp}"),
        (not num_experts or cfg.moe_tp_size * cfg.moe_ep_size == tp,
         f"moe_tp_size={cfg.moe_tp_size} * moe_ep_size={cfg.moe_ep_size} != tp_size={tp}"),
        (not num_experts or cfg.intermediate_size % cfg.moe_tp_size == 0,
         f"intermediate_size not divisible by moe_tp_size={cfg.moe_tp_size}"),
        (not num_experts or num_experts % cfg.moe_ep_size == 0,
         f"moe.num_experts={num_experts} not divisible by moe_ep_size={cfg.moe_ep_size}"),
        (not num_experts or 1 <= cfg.top_k <= num_experts, f"moe.top_k={cfg.top_k} outside [1, {num_experts}]"),
        (cfg.embedding_sharding_dim in (0, 1), "embedding_sharding_dim must be 0 or 1"),
        (kind != "longrope" or all(len(cfg.rotary_scaling[f]) == cfg.head_size // 2
                                   for f in ("short_factor", "long_factor")),
         f"longrope factors must have head_size / 2 = {cfg.head_size // 2} entries"),
        (not cfg.share_embedding_table or tp == 1 or (cfg.use_parallel_embedding and cfg.embedding_sharding_dim == 0),
         "share_embedding_table at tp_size > 1 needs a vocab-parallel embedding (embedding_sharding_dim 0)"),
        (not (cfg.use_parallel_embedding and cfg.embedding_sharding_dim == 1)
         or hidden % tp == 0, f"hidden_size not divisible by tp={tp} (embedding_sharding_dim=1)"),
    ]
    for ok, problem in checks:
        if not ok:
            raise bad(problem)

    positions = get_family(forward).position_embedding_type
    unsupported = [
        (bool(num_experts) and not family_moe, f"MoE checkpoints are not supported by the {forward!r} forward"),
        (bool(num_experts) and moe.get("normalization_mode", 1) != 1,
         f"MoE normalization_mode {moe.get('normalization_mode')!r} (supported: 1, renormalize)"),
        (bool(num_experts) and cfg.hidden_act != "swiglu", f"MoE with hidden_act {cfg.hidden_act!r} (supported: swiglu)"),
        (cfg.hidden_act not in ACTIVATIONS,
         f"unsupported hidden_act {cfg.hidden_act!r} (supported: {sorted(ACTIVATIONS)})"),
        (raw.get("position_embedding_type") not in ({positions, LONG_ROPE} if positions == POSITION_EMBEDDING else {positions}),
         f"unsupported position_embedding_type {raw.get('position_embedding_type')!r} "
         f"(the {forward} forward executes {positions!r})"),
        (int(raw.get("rotary_embedding_dim") or cfg.head_size) != cfg.head_size,
         f"partial rotary (rotary_embedding_dim {raw.get('rotary_embedding_dim')} < head_size {cfg.head_size})"),
        (kind not in ROTARY_SCALING_TYPES,
         f"unsupported rotary_scaling {scaling!r} (types: {ROTARY_SCALING_TYPES})"),
        (bool(quant.get("quant_algo") or quant.get("kv_cache_quant_algo")),
         f"quantized checkpoints are not supported ({quant})"),
        (mapping.get("cp_size", 1) != 1, "context parallelism (mapping.cp_size > 1) is not supported"),
    ]
    for hit, feature in unsupported:
        if hit:
            raise CheckNotRun(f"{path}: {feature}")
    diverges = cfg.rotary_scaling and rotary.unexecutable(cfg.rotary_scaling, cfg.max_position_embeddings,
                                                          long_rope=raw.get("position_embedding_type") == LONG_ROPE)
    if diverges:
        raise CheckNotRun(f"{path}: {diverges}")
    return cfg


def longrope_scaling(raw: dict, bad: Callable[[str], ValueError]) -> dict[str, Any]:
    """TensorRT-LLM's ``long_rope`` fields as one rotary scaling of type longrope; an absent mscale takes
    TensorRT-LLM's default (``rotary.inv_freq`` computes it)."""
    fields = ("longrope_scaling_short_factors", "longrope_scaling_long_factors", "original_max_position_embeddings")
    missing = [f for f in fields if raw.get(f) is None]
    if missing:
        raise bad(f"position_embedding_type long_rope without {', '.join(missing)}")
    scaling = {
        "rope_type": "longrope",
        "short_factor": list(raw["longrope_scaling_short_factors"]),
        "long_factor": list(raw["longrope_scaling_long_factors"]),
        "original_max_position_embeddings": int(raw["original_max_position_embeddings"]),
    }
    for branch in ("short", "long"):
        if raw.get(f"longrope_{branch}_mscale") is not None:
            scaling[f"{branch}_mscale"] = float(raw[f"longrope_{branch}_mscale"])
    return scaling
