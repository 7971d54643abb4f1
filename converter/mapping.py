"""Rank topology: tp/pp coordinates of a rank, the layers of each pipeline stage, and the expert (MoE) split
of the TP group."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ShardproofError


@dataclass(frozen=True)
class Mapping:
    """TensorRT-LLM's rank layout: rank = pp_rank * tp_size + tp_rank.

    Experts split the TP group as `moe_tp_size * moe_ep_size == tp_size` (`tensorrt_llm/mapping.py`): left out,
    both default as TensorRT-LLM's do (all tensor-parallel: moe_tp = tp, moe_ep = 1; one given: the other is
    tp divided by it).
    """

    tp_size: int = 1
    pp_size: int = 1
    moe_tp_size: int | None = None
    moe_ep_size: int | None = None

    def __post_init__(self) -> None:
        if self.tp_size < 1 or self.pp_size < 1:
            raise ShardproofError(f"tp_size={self.tp_size} and pp_size={self.pp_size} must both be at least 1")
        moe_tp, moe_ep = self.moe_tp_size, self.moe_ep_size
        if moe_tp is None and moe_ep is None:
            moe_tp, moe_ep = self.tp_size, 1
        elif moe_tp is None:
            moe_tp = self.tp_size // moe_ep if moe_ep >= 1 else moe_ep
        elif moe_ep is None:
            moe_ep = self.tp_size // moe_tp if moe_tp >= 1 else moe_tp
        if moe_tp < 1 or moe_ep < 1 or moe_tp * moe_ep != self.tp_size:
            raise ShardproofError(
                f"moe_tp_size={moe_tp} times moe_ep_size={moe_ep} must equal tp_size={self.tp_size}"
            )
        object.__setattr__(self, "moe_tp_size", moe_tp)
        object.__setattr__(self, "moe_ep_size", moe_ep)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    def rank(self, tp_rank: int, pp_rank: int) -> int:
        return pp_rank * self.tp_size + tp_rank

    def coords(self, rank: int) -> tuple[int, int]:
        """(tp_rank, pp_rank) of a rank."""
        return rank % self.tp_size, rank // self.tp_size

    def moe_tp_rank(self, tp_rank: int) -> int:
        """The expert-TP rank of a TP rank: tp_rank // moe_ep_size (TensorRT-LLM's `Mapping.moe_tp_rank`)."""
        return tp_rank // self.moe_ep_size

    def moe_ep_rank(self, tp_rank: int) -> int:
        """The expert-parallel rank of a TP rank: tp_rank % moe_ep_size (`Mapping.moe_ep_rank`)."""
        return tp_rank % self.moe_ep_size

    def stage_layers(self, num_layers: int, pp_rank: int) -> range:
        """Global layer indices of a stage: torch.tensor_split(arange(L), pp), the first stages taking the extra layers."""
        if self.pp_size > num_layers:
            raise ShardproofError(f"pp_size={self.pp_size} is larger than num_hidden_layers={num_layers}")
        part = torch.tensor_split(torch.arange(num_layers), self.pp_size)[pp_rank]
        return range(int(part[0]), int(part[-1]) + 1)

    def to_config(self) -> dict:
        """The `mapping` section of TensorRT-LLM's config.json."""
        return {
            "world_size": self.world_size,
            "gpus_per_node": 8,
            "cp_size": 1,
            "tp_size": self.tp_size,
            "pp_size": self.pp_size,
            "moe_tp_size": self.moe_tp_size,
            "moe_cluster_size": 1,
            "moe_ep_size": self.moe_ep_size,
            "attn_tp_size": self.tp_size,
            "attn_cp_size": 1,
        }

    @classmethod
    def from_config(cls, mapping: dict) -> "Mapping":
        """The mapping of a TensorRT-LLM config.json; every size must be an integer (not 2.5, "2" or true)."""
        for key in ("tp_size", "pp_size", "moe_tp_size", "moe_ep_size", "world_size"):
            value = mapping.get(key, 1)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ShardproofError(f"mapping.{key}={value!r} must be an integer")
        moe = {k: mapping[k] for k in ("moe_tp_size", "moe_ep_size") if k in mapping}
        mapping_ = cls(tp_size=mapping.get("tp_size", 1), pp_size=mapping.get("pp_size", 1), **moe)
        world = mapping.get("world_size", mapping_.world_size)
        if world != mapping_.world_size:
            raise ShardproofError(f"mapping.world_size={world} is not tp_size*pp_size={mapping_.world_size}")
        return mapping_
