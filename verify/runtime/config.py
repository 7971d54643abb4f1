"""``config.json`` of a TensorRT-LLM checkpoint as the runtime reads it: generic fields, checked.

A fault of the file (bad JSON, a missing key, sizes the mapping cannot split) raises ``ValueError``; a valid
file asking for a feature the runtime does not execute (quantization, MoE, context parallelism, a position
embedding its family forward does not declare, an activation or rotary scaling) raises ``CheckNotRun``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shardproof.converter.card import get_card, supported_architectures
from shardproof.converter.errors import CheckNotRun, ShardproofError

from .blocks import ACTIVATIONS, ROTARY_SCALING_TYPES
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
        return math.ceil(self.vocab_size / self.tp_size)

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
    except ShardproofError:
        raise bad(f"unsupported architecture {arch!r} (supported: {supported_architectures()})") from None
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

    kind = "default" if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind is None:
        raise bad(f"rotary_scaling {scaling!r} names no rope_type")

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
        (cfg.intermediate_size % tp == 0, f"intermediate_size not divisible by tp={tp}"),
        (cfg.embedding_sharding_dim in (0, 1), "embedding_sharding_dim must be 0 or 1"),
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
        (cfg.hidden_act not in ACTIVATIONS,
         f"unsupported hidden_act {cfg.hidden_act!r} (supported: {sorted(ACTIVATIONS)})"),
        (raw.get("position_embedding_type") != positions,
         f"unsupported position_embedding_type {raw.get('position_embedding_type')!r} "
         f"(the {forward} forward executes {positions!r})"),
        (kind not in ROTARY_SCALING_TYPES,
         f"unsupported rotary_scaling {scaling!r} (types: {ROTARY_SCALING_TYPES})"),
        (bool(quant.get("quant_algo") or quant.get("kv_cache_quant_algo")),
         f"quantized checkpoints are not supported ({quant})"),
        (bool((raw.get("moe") or {}).get("num_experts", 0)), "MoE checkpoints are not supported"),
        (mapping.get("cp_size", 1) != 1, "context parallelism (mapping.cp_size > 1) is not supported"),
    ]
    for hit, feature in unsupported:
        if hit:
            raise CheckNotRun(f"{path}: {feature}")
    return cfg
