"""The golden cases of a card, derived from the card alone: the same layouts for every registered family.

Every case starts from the card's tiny config with its self-test switches on (so every optional row, biases and
all, has a golden); the tiny vocabulary (97) is divisible by no tp above 1, so every tp > 1 case pads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shardproof.converter.card import Card, get_card
from shardproof.converter.errors import ShardproofError
from shardproof.verify.tiny_models import tiny_config

SEED = 20261201


@dataclass(frozen=True)
class GoldenCase:
    """One source model (card, config overrides, seed) and one conversion layout."""

    architecture: str
    label: str
    dtype: str
    tp_size: int = 1
    pp_size: int = 1
    use_parallel_embedding: bool = False
    overrides: dict[str, Any] = field(default_factory=dict, hash=False)
    seed: int = SEED

    @property
    def name(self) -> str:
        return f"{self.architecture}-{self.label}"

    @property
    def layout(self) -> dict[str, Any]:
        """Keyword arguments of `shardproof.converter.api.convert`."""
        return dict(dtype=self.dtype, tp_size=self.tp_size, pp_size=self.pp_size,
                    use_parallel_embedding=self.use_parallel_embedding)


# (label, layout, config overrides on top of the card's self-test config)
LAYOUTS: tuple[tuple[str, dict[str, Any], dict[str, Any]], ...] = (
    ("tp1-pp1-float32", dict(dtype="float32"), {}),
    ("tp2-pp2-bfloat16", dict(dtype="bfloat16", tp_size=2, pp_size=2), {}),
    ("tp4-float16-kv2-parallel-embedding",
     dict(dtype="float16", tp_size=4, use_parallel_embedding=True), dict(num_key_value_heads=2)),
)
TIED = ("tp2-float32-tied", dict(dtype="float32", tp_size=2), dict(tie_word_embeddings=True))


def accepts(card: Card, overrides: dict[str, Any]) -> bool:
    """Whether the card's config translation takes the tiny config with `overrides` (e.g. tied embeddings)."""
    try:
        card.config.dims_from_hf(tiny_config(card.name, **overrides))
    except ShardproofError:
        return False
    return True


def cases_for(architecture: str) -> list[GoldenCase]:
    """The card's golden cases: every layout, plus a tied-embedding case when the card's config allows one."""
    card = get_card(architecture)
    base = dict(card.tests.selftest)
    chosen = list(LAYOUTS)
    if accepts(card, {**base, **TIED[2]}):
        chosen.append(TIED)
    return [GoldenCase(architecture, label, overrides={**base, **extra}, **layout) for label, layout, extra in chosen]
