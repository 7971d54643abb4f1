"""The golden cases of a card, derived from the card alone: the same layouts for every registered family, in
every target the card supports (converter/target.py).

Every case starts from the card's tiny config with its self-test switches on (so every optional row, biases and
all, has a golden); the tiny vocabulary (97) is divisible by no tp above 1, so every tp > 1 case pads it. A target
runs the same cases as the default one, less a case it refuses for the model (a condition the card lists in
`TargetRows.refused`, such as tied embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shardproof.converter.card import Card, get_card
from shardproof.converter.errors import ShardproofError
from shardproof.converter.mapping import Mapping
from shardproof.converter.plan import DEFAULT_TARGET, Layout, check_not_refused
from shardproof.converter.target import Target, get_target
from shardproof.verify.tiny_models import tiny_config

SEED = 20261201


@dataclass(frozen=True)
class GoldenCase:
    """One source model (card, config overrides, seed) and one conversion layout, in one target."""

    architecture: str
    label: str
    dtype: str
    tp_size: int = 1
    pp_size: int = 1
    use_parallel_embedding: bool = False
    overrides: dict[str, Any] = field(default_factory=dict, hash=False)
    seed: int = SEED
    target: str = DEFAULT_TARGET

    @property
    def name(self) -> str:
        """`{architecture}-{label}`, under `{target}/` for a target other than the default: also the path of the
        case's manifest in its directory, less `.json` (the default target's manifests predate targets)."""
        stem = f"{self.architecture}-{self.label}"
        return stem if self.target == DEFAULT_TARGET else f"{self.target}/{stem}"

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


def translates(card: Card, overrides: dict[str, Any]) -> bool:
    """Whether the card's config translation takes the tiny config with `overrides` (e.g. tied embeddings)."""
    try:
        card.config.dims_from_hf(tiny_config(card.name, **overrides))
    except ShardproofError:
        return False
    return True


def refused(card: Card, overrides: dict[str, Any], target: str | Target, layout: dict[str, Any]) -> bool:
    """Whether `target` refuses the tiny config with `overrides` converted with `layout` (keyword arguments of
    `convert`): a condition the card lists in its `TargetRows.refused`. A config the card cannot translate is no
    refusal (converting it fails)."""
    try:
        dims = card.config.dims_from_hf(tiny_config(card.name, **overrides))
    except ShardproofError:
        return False
    target_ = get_target(target)
    planned = Layout(layout["dtype"], Mapping(layout.get("tp_size", 1), layout.get("pp_size", 1)),
                     layout.get("use_parallel_embedding", False))
    try:
        check_not_refused(card, dims, target_.layout(planned, dims, card), target_, card.name)
    except ShardproofError:
        return True
    return False


def cases_for(architecture: str, target: str | None = None) -> list[GoldenCase]:
    """The card's golden cases in `target` (default: the TensorRT-LLM checkpoint; ShardproofError when the card
    does not support it): every layout, plus a tied-embedding case when the card's config and the target allow
    one."""
    card = get_card(architecture)
    target_ = get_target(target)
    target_.rows(card)
    base = dict(card.tests.selftest)
    chosen = list(LAYOUTS)
    tied = {**base, **TIED[2]}
    if translates(card, tied) and not refused(card, tied, target_, TIED[1]):
        chosen.append(TIED)
    return [GoldenCase(architecture, label, overrides={**base, **extra}, target=target_.name, **layout)
            for label, layout, extra in chosen]
