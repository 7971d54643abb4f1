"""Registry coverage: every tensor transformers would save for a card's tiny configs is mapped by a row of the target
or skipped by a named rule (the plan fails closed), and every config field is read or ignored with a reason; for an
architecture no card maps, the saved parameters that no registered card maps."""

from __future__ import annotations

import re
from typing import Any

from shardproof.converter.card import cards, get_card, supported_architectures
from shardproof.converter.errors import ShardproofError
from shardproof.converter.mapping import Mapping
from shardproof.converter.plan import DEFAULT_TARGET, Layout, build_plan
from shardproof.converter.target import get_target
from shardproof.golden.cases import cases_for
from shardproof.verify.tiny_models import TINY, saved_shapes, saved_tensor_shapes, tiny_config

LAYER_INDEX = re.compile(r"\.\d+\.")
PLACEHOLDER = re.compile(r"\\\{\w+\\\}")  # an escaped `{i}`, `{e}` index of a row's source pattern


def coverage_failures(architecture: str, target: str = DEFAULT_TARGET) -> tuple[list[str], int]:
    """(what is not covered, how many configs were checked) over the card's tiny config and its golden cases' in
    `target`, each planned in that target."""
    card = get_card(architecture)
    target_ = get_target(target)
    variants = {repr(sorted(o.items())): o for o in [{}, *(case.overrides for case in cases_for(architecture, target))]}
    failures = []
    for overrides in variants.values():
        config = tiny_config(architecture, **overrides)
        where = f"tiny config {overrides or '(defaults)'}"
        try:
            card.config.ignored(config.to_diff_dict())
            dims = card.config.dims_from_hf(config)
            layout = target_.layout(Layout("float32", Mapping()), dims, card)
            build_plan(card, dims, layout, saved_shapes(architecture, **overrides), where, target_)
        except ShardproofError as e:
            failures.append(f"{where}: {e}")
    return failures, len(variants)


def _card_patterns() -> list[re.Pattern]:
    """Every registered card's row sources (each index as digits) and skip rules."""
    patterns = []
    for card in cards():
        for row in card.rows:
            patterns += [re.compile(PLACEHOLDER.sub(r"\\d+", re.escape(s)) + "$") for s in row.sources]
        patterns += [re.compile(skip.pattern) for skip in card.skips]
    return patterns


def unmapped_parameters(architecture: str) -> list[str]:
    """Tensors a tiny `architecture` model (a transformers class) saves that no registered card maps or skips,
    indices (layers, experts) written as {n}; ShardproofError when transformers has no such model class."""
    import transformers

    model_class: Any = getattr(transformers, architecture, None)
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise ShardproofError(f"architecture {architecture!r} is neither registered (supported: "
                              f"{', '.join(supported_architectures())}) nor a transformers model class")
    config = model_class.config_class(**TINY)
    config.architectures = [architecture]
    patterns = _card_patterns()
    names = saved_tensor_shapes(model_class(config))
    return list(dict.fromkeys(LAYER_INDEX.sub(".{n}.", n) for n in names if not any(p.match(n) for p in patterns)))


def refuse_unregistered(architectures: list[str]) -> None:
    """ShardproofError for the first architecture no card maps, listing its HF model's unmapped parameters."""
    registered = set(supported_architectures())
    for name in architectures:
        if name in registered:
            continue
        unmapped = unmapped_parameters(name)
        raise ShardproofError(
            f"architecture {name!r} is not mapped by any card (supported: {', '.join(sorted(registered))}); "
            f"{len(unmapped)} parameter(s) of its HF model are mapped by no card: {', '.join(unmapped) or '(none)'}"
        )
