"""The cross-rank steps of one TP group, and their in-process simulation."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class Collectives(Protocol):
    """Cross-rank steps of one TP group; lists hold one tensor per TP rank run in this process."""

    def all_reduce(self, parts: list[Tensor]) -> list[Tensor]: ...

    def all_gather(self, parts: list[Tensor], dim: int) -> list[Tensor]: ...


class SimulatedCollectives:
    """Every TP rank of a stage in this process; sums in ascending rank order."""

    def all_reduce(self, parts: list[Tensor]) -> list[Tensor]:
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return [total] * len(parts)

    def all_gather(self, parts: list[Tensor], dim: int) -> list[Tensor]:
        return [torch.cat(parts, dim)] * len(parts)
