"""Rank topology: tp/pp coordinates of a rank and the layers of each pipeline stage."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ShardproofError


@dataclass(frozen=True)
class Mapping:
    """TensorRT-LLM's rank layout: rank = pp_rank * tp_size + tp_rank."""

    tp_size: int = 1
    pp_size: int = 1

    def __post_init__(self) -> None:
        if self.tp_size < 1 or self.pp_size < 1:
            raise ShardproofError(f"tp_size={self.tp_size} and pp_size={self.pp_size} must both be at least 1")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    def rank(self, tp_rank: int, pp_rank: int) -> int:
        return pp_rank * self.tp_size + tp_rank

    def coords(self, rank: int) -> tuple[int, int]:
        """(tp_rank, pp_rank) of a rank."""
        return rank % self.tp_size, rank // self.tp_size

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
            "moe_tp_size": self.tp_size,
            "moe_cluster_size": 1,
            "moe_ep_size": 1,
            "attn_tp_size": self.tp_size,
            "attn_cp_size": 1,
        }

    @classmethod
    def from_config(cls, mapping: dict) -> "Mapping":
        mapping_ = cls(tp_size=int(mapping.get("tp_size", 1)), pp_size=int(mapping.get("pp_size", 1)))
        world = mapping.get("world_size", mapping_.world_size)
        if world != mapping_.world_size:
            raise ShardproofError(f"mapping.world_size={world} is not tp_size*pp_size={mapping_.world_size}")
        return mapping_
