"""What an architecture module declares: model dimensions, mapping rules, skip rules, config translation.

An architecture is data: a table of rules `(target, sources, shard kind, stage, condition)`, a table of the
source tensors' shapes, the source tensors skipped on purpose, and the two config translations (HF ->
TensorRT-LLM for the converter, TensorRT-LLM -> HF for the reassembler). The plan and the reassembler are both
derived from the same table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, Callable, Literal

from .errors import ShardproofError
from .format_ops import FormatOp

Shape = tuple[int, ...]
ShardKind = Literal["replicated", "column", "row", "vocab", "embedding", "qkv"]
Stage = Literal["first", "layer", "last"]


@dataclass(frozen=True)
class ModelDims:
    """The numbers and switches that decide every tensor's name and shape."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    qkv_bias: bool = False
    dense_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or value < 1):
                raise ShardproofError(f"model dimension {f.name}={value!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ShardproofError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )

    def holds(self, condition: str | None) -> bool:
        """Whether a rule's condition ("qkv_bias", "!tie_word_embeddings", None) holds for this model."""
        if condition is None:
            return True
        negate = condition.startswith("!")
        return bool(getattr(self, condition.lstrip("!"))) != negate


@dataclass(frozen=True)
class Rule:
    """One target tensor made from its source tensors (through `op` first, if any); `{i}` is the layer (local in
    targets, global in sources)."""

    target: str
    sources: tuple[str, ...]
    shard: ShardKind
    stage: Stage
    when: str | None = None
    op: FormatOp | None = None

    def __post_init__(self) -> None:
        wildcards = {"{i}" in self.target} | {"{i}" in s for s in self.sources}
        if len(wildcards) != 1 or (("{i}" in self.target) != (self.stage == "layer")):
            raise ValueError(f"rule {self.target}: '{{i}}' must appear in the target and every source of a layer rule only")


def layer(target: str, *sources: str, shard: ShardKind, when: str | None = None, op: FormatOp | None = None) -> Rule:
    return Rule(f"transformer.layers.{{i}}.{target}", sources, shard, "layer", when, op)


def first(target: str, *sources: str, shard: ShardKind, when: str | None = None, op: FormatOp | None = None) -> Rule:
    return Rule(target, sources, shard, "first", when, op)


def last(target: str, *sources: str, shard: ShardKind, when: str | None = None, op: FormatOp | None = None) -> Rule:
    return Rule(target, sources, shard, "last", when, op)


@dataclass(frozen=True)
class Skip:
    """Source tensors deliberately not converted, matched by regular expression, with the reason."""

    pattern: str
    reason: str
    when: str | None = None

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


@dataclass(frozen=True)
class Architecture:
    """Everything shardproof knows about one HF architecture (also TensorRT-LLM's `architecture` name)."""

    name: str
    model_type: str
    rules: tuple[Rule, ...]
    source_shapes: Callable[[ModelDims], dict[str, Shape]]
    skips: tuple[Skip, ...]
    dims_from_hf: Callable[[Any], ModelDims]
    trt_fields: Callable[[Any, ModelDims], dict]
    dims_from_trt: Callable[[dict], ModelDims]
    hf_config: Callable[[dict], dict]
    forward: str  # the sharded runtime's family forward that executes this architecture


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Register an architecture under its HF name."""
    if arch.name in _REGISTRY:
        raise ValueError(f"architecture {arch.name} is registered twice")
    _REGISTRY[arch.name] = arch
    return arch


def get_architecture(name: str) -> Architecture:
    """The registered architecture called `name`, or a ShardproofError listing the supported ones."""
    from . import architectures  # noqa: F401  (registers the built-in architectures)

    if name not in _REGISTRY:
        raise ShardproofError(f"architecture {name!r} is not supported (supported: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def supported_architectures() -> list[str]:
    from . import architectures  # noqa: F401

    return sorted(_REGISTRY)
