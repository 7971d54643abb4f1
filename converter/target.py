"""Targets: the per-rank layouts a plan can produce, registered by name.

A target says which rows of a card lay the ranks out (`rows`), whether layer names carry the global layer index,
and the layout rule it forces. Two are built in:

- `trtllm-checkpoint` (the default): TensorRT-LLM's checkpoint format, `rank{N}.safetensors` beside its
  `config.json` (docs/format.md, a frozen spec); the card's own `rows` and layout rule.
- `trtllm-pytorch`: the parameters of TensorRT-LLM's PyTorch backend as each rank holds them after loading an HF
  checkpoint (`model.layers.{i}.self_attn.qkv_proj.weight`, ...), `rank{N}.safetensors` beside `rank{N}.json`
  (converter/rank_metadata.py); the card's `targets["trtllm-pytorch"]` rows. The sharded runtime executes it
  through a view onto the checkpoint target's tensors (`runtime_view`, verify/runtime/target_view.py).

`register_target` adds one from anywhere (the registry is small and public, like the card registry).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

from .card import Card, Dims, TargetRows
from .errors import ShardproofError
from .registry import Registry, caller_module
from .plan import DEFAULT_TARGET, Layout


def _card_layout(layout: Layout, dims: Dims, card: Card) -> Layout:
    return card.layout(layout, dims)


@dataclass(frozen=True)
class Target:
    """One target layout. `layout(layout, dims, card)` is the layout rule it forces; `global_layers`: layer names
    carry the global layer index (else the stage-local one); `trt_config`: the checkpoint directory holds
    TensorRT-LLM's config.json (else one `rank{N}.json` per rank); `runtime_view`: the sharded runtime executes
    its rank files through a view onto the default target's tensor names (else directly)."""

    name: str
    description: str
    global_layers: bool = False
    trt_config: bool = True
    runtime_view: bool = False
    layout: Callable[[Layout, Dims, Card], Layout] = _card_layout

    def rows(self, card: Card) -> TargetRows:
        """The card's rows for this target; ShardproofError naming the reason when the card cannot be converted
        to it."""
        held = TargetRows(card.rows) if self.name == DEFAULT_TARGET else card.targets.get(self.name)
        if held is None:
            held = TargetRows(unsupported=f"its card declares no {self.name} layout")
        if held.unsupported:
            raise ShardproofError(f"{card.name}: target {self.name} is not supported: {held.unsupported}")
        return held

    def supports(self, card: Card) -> bool:
        try:
            self.rows(card)
        except ShardproofError:
            return False
        return True


TARGETS: Registry[Target] = Registry("target")


def register_target(target: Target) -> Target:
    """Register a target under its name (from shardproof, a plugin or the calling program: `shardproof list` says)."""
    return TARGETS.add(target.name, target, caller_module())


def get_target(name: str | Target | None) -> Target:
    """The target registered as `name` (None: the default), or ShardproofError listing the registered ones."""
    if isinstance(name, Target):
        return name
    return TARGETS.get(name or DEFAULT_TARGET)


def targets() -> list[Target]:
    """Every registered target, the default first."""
    return list(TARGETS)


def targets_for(card: Card, names: Sequence[str] | None = None, strict: bool = False) -> list[Target]:
    """The targets of `names` (None: every registered one, the default first) that can lay out `card`; with
    `strict`, a named target the card does not support is bad input (ShardproofError saying why)."""
    chosen = [get_target(name) for name in dict.fromkeys(names)] if names else list(TARGETS)
    if strict and names:
        for target in chosen:
            target.rows(card)
    return [target for target in chosen if target.supports(card)]


def _pytorch_layout(layout: Layout, dims: Dims, card: Card) -> Layout:
    """The PyTorch backend's decoders build their embedding and lm_head vocab-parallel (TensorParallelMode.COLUMN)
    whatever the flags say, and tie them by sharing one parameter: no layout switch applies."""
    return dataclasses.replace(layout, use_parallel_embedding=True, embedding_sharding_dim=0,
                               share_embedding_table=False)


CHECKPOINT = register_target(Target(DEFAULT_TARGET, "TensorRT-LLM checkpoint: rank files beside its config.json"))
PYTORCH = register_target(Target(
    "trtllm-pytorch",
    "TensorRT-LLM PyTorch backend: each rank's module parameters after load_weights, beside rank{N}.json",
    global_layers=True, trt_config=False, runtime_view=True, layout=_pytorch_layout,
))
