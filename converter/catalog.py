"""Every registered component, by kind, with where it came from: what `shardproof list` prints."""

from __future__ import annotations

from dataclasses import dataclass, field

from .card import CARDS
from .loaders import CHECKPOINT_LOADERS, CONFIG_LOADERS, WEIGHT_LOADERS
from .target import TARGETS


@dataclass(frozen=True)
class Component:
    """One registered component: its kind, name, origin (`built-in`, `plugin <dist> <version>`, `in-process
    (<module>)`) and what it is made of."""

    kind: str
    name: str
    origin: str
    details: dict[str, str] = field(default_factory=dict)


def catalog() -> list[Component]:
    """Architectures, checkpoint formats, config loaders, weight loaders and targets, each in registration order."""
    out = [Component("architecture", e.name, e.origin, {"model_type": e.item.model_type, "runtime forward": e.item.forward})
           for e in CARDS.entries()]
    out += [Component("checkpoint format", e.name, e.origin,
                      {"config loader": e.item.config_loader, "weight loader": e.item.weight_loader})
            for e in CHECKPOINT_LOADERS.entries()]
    out += [Component("config loader", e.name, e.origin) for e in CONFIG_LOADERS.entries()]
    out += [Component("weight loader", e.name, e.origin, {"reads": type(e.item).expects}) for e in WEIGHT_LOADERS.entries()]
    return out + [Component("target", e.name, e.origin, {"description": e.item.description}) for e in TARGETS.entries()]
