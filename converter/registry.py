"""Registries of extension components, each entry with where it came from, and the plugins that fill them.

Every kind of component (architecture cards, config loaders, weight loaders, checkpoint loaders, targets) has one
`Registry`. Built-ins register when their modules are imported; an installed package adds components through an
entry point in the group `shardproof.plugins` naming a module whose import registers them (with the same
decorators and `register` calls). `load_all` imports the built-ins, then every plugin, once, before the first
lookup.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from dataclasses import dataclass
from typing import Generic, Iterator, TypeVar

from .errors import ShardproofError

ENTRY_POINT_GROUP = "shardproof.plugins"
BUILTIN_MODULES = ("shardproof.converter.cards", "shardproof.converter.formats")

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered component: its name, the component, and the module that registered it."""

    name: str
    item: T
    module: str

    @property
    def origin(self) -> str:
        """`built-in`, `plugin <distribution> <version>`, or `in-process (<module>)`."""
        return origin(self.module)


_PLUGIN_PACKAGES: dict[str, str] = {}  # top-level package of a loaded entry point -> "plugin <dist> <version>"


def origin(module: str) -> str:
    """Where a component registered by `module` came from."""
    top = module.split(".")[0]
    if top == "shardproof":
        return "built-in"
    return _PLUGIN_PACKAGES.get(top, f"in-process ({module})")


class Registry(Generic[T]):
    """Components of one `kind`, by name, in registration order (built-ins first, then plugins)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.by_name: dict[str, Entry[T]] = {}  # a test swaps an entry for its own with monkeypatch.setitem

    def add(self, name: str, item: T, module: str) -> T:
        """Register `item` as `name`, registered by `module`; a name registered twice is refused."""
        if name in self.by_name:
            raise ShardproofError(f"{self.kind} {name!r} from {origin(module)} is already registered "
                                  f"(by {self.by_name[name].origin})")
        self.by_name[name] = Entry(name, item, module)
        return item

    def remove(self, name: str) -> None:
        """Remove an entry (a test that registers its own component cleans up with this)."""
        self.by_name.pop(name)

    def find(self, name: str) -> T | None:
        """The component registered as `name`, or None."""
        load_all()
        entry = self.by_name.get(name)
        return None if entry is None else entry.item

    def get(self, name: str) -> T:
        """The component registered as `name`, or a ShardproofError listing the registered names."""
        item = self.find(name)
        if item is None:
            raise ShardproofError(f"no {self.kind} named {name!r} (registered: {', '.join(self.names()) or 'none'})")
        return item

    def entries(self) -> list[Entry[T]]:
        load_all()
        return list(self.by_name.values())

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]

    def __iter__(self) -> Iterator[T]:
        return iter([e.item for e in self.entries()])


def caller_module(depth: int = 2) -> str:
    """The module of the function `depth` frames up (the one calling a `register` function)."""
    return sys._getframe(depth).f_globals.get("__name__", "?")


_LOADED = False


def plugin_entry_points() -> list[importlib.metadata.EntryPoint]:
    """The installed `shardproof.plugins` entry points, sorted by name (a deterministic order)."""
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def load_all() -> None:
    """Import the built-in components, then every plugin's module, once. A plugin that cannot be imported, or that
    registers a name already taken, is bad input: ShardproofError naming the plugin."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True  # a plugin may look components up while it registers its own
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    for ep in plugin_entry_points():
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        _PLUGIN_PACKAGES[ep.value.split(":")[0].split(".")[0]] = f"plugin {dist} {version}"
        try:
            ep.load()
        except ShardproofError as e:
            raise ShardproofError(f"plugin {ep.name} ({dist} {version}): {e}") from None
        except Exception as e:  # noqa: BLE001  (any import failure of a third-party module is bad input)
            reason = " ".join(str(e).split()) or type(e).__name__
            raise ShardproofError(f"plugin {ep.name} ({dist} {version}): cannot import {ep.value} ({reason})") from None
