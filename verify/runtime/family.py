"""What a family forward provides, and the registry the runtime picks one from by its forward name.

An architecture card names its forward (``Architecture.forward``); the module of that name under
``families/`` registers a ``Family`` here when imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from torch import Tensor

from shardproof.converter.errors import CheckNotRun

if TYPE_CHECKING:
    from shardproof.converter.card import Shape

    from .blocks import Rope
    from .collectives import Collectives
    from .config import RuntimeConfig
    from .rank_files import RankWeights


class Family(Protocol):
    """One family's forward, per TP rank, and the tensors its rank files hold; ``position_embedding_type`` is
    the config value it executes (``rope_gpt_neox``, ``learned_absolute``).

    Optional: ``moe = True`` when the forward executes a config's ``moe`` experts; ``dtypes(cfg, rank)``, the
    tensors kept in a dtype other than the checkpoint's (full name -> dtype).
    """

    name: str
    position_embedding_type: str

    def tensors(self, cfg: RuntimeConfig, rank: int) -> dict[str, Shape]:
        """Every tensor name of ``rank{rank}.safetensors`` with its shape, from the config alone."""
        ...

    def embed(self, ids: Tensor, ws: list[RankWeights], cfg: RuntimeConfig, comm: Collectives) -> list[Tensor]:
        """First stage: token ids [B, T] to per-rank hidden states."""
        ...

    def layer(self, xs: list[Tensor], ws: list[RankWeights], cfg: RuntimeConfig, rope: Rope,
              comm: Collectives) -> list[Tensor]:
        """One decoder layer (``ws`` scoped to it)."""
        ...

    def logits(self, xs: list[Tensor], ws: list[RankWeights], cfg: RuntimeConfig, comm: Collectives) -> list[Tensor]:
        """Last stage: per-rank hidden states to float32 logits [B, T, vocab_size]."""
        ...


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Register ``family`` under its forward name."""
    if family.name in _FAMILIES:
        raise ValueError(f"runtime family {family.name} is registered twice")
    _FAMILIES[family.name] = family
    return family


def get_family(forward: str) -> Family:
    """The family registered as ``forward``; ``CheckNotRun`` when no family module implements it."""
    from . import families  # noqa: F401  (registers the built-in families)

    if forward not in _FAMILIES:
        raise CheckNotRun(f"the sharded runtime has no family forward {forward!r} "
                          f"(implemented: {', '.join(sorted(_FAMILIES))})")
    return _FAMILIES[forward]
