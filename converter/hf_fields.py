"""A card's own reading of an HF config.json: for each field it reads, the JSON types its transformers config class
accepts and the default that class gives a config.json that leaves the field out.

`convert`, `inspect` and the target reader plan from this reading; they never import transformers, whose config load
(its imports, then the parse) costs 1-11 s of every convert. Verification still builds the HF-side model from
transformers' own parse, and its weights check compares the dims the card reads from that parse. tests/test_hf_fields.py
holds each card's reading equal to transformers' (defaults, legacy spellings, rope) and checks that it accepts no
value transformers refuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .errors import ShardproofError

NoneType = type(None)
_SPELLED = {int: "an integer", float: "a float", bool: "true or false", str: "a string", dict: "an object",
            list: "a list", NoneType: "null"}


@dataclass(frozen=True)
class HFField:
    """A config field a card reads. `types`: what the value may be, matched exactly as transformers' strict config
    classes match (true is not an integer, 1 is not a float); `positive`: an integer must be at least 1."""

    types: tuple[type, ...]
    default: Any
    positive: bool = False

    def check(self, name: str, value: Any) -> None:
        """ShardproofError naming the field when `value` is not one this field takes."""
        if type(value) not in self.types:
            wanted = " or ".join(_SPELLED[t] for t in self.types)
            raise ShardproofError(f"{name}={value!r}: must be {wanted}")
        if self.positive and type(value) is int and value < 1:
            raise ShardproofError(f"{name}={value!r}: a size or count must be a positive integer, not zero or below")


def size(default: int | None, optional: bool = False) -> HFField:
    """A positive integer (or null, when `optional`)."""
    return HFField((int, NoneType) if optional else (int,), default, positive=True)


def flag(default: bool | None, optional: bool = False) -> HFField:
    return HFField((bool, NoneType) if optional else (bool,), default)


def number(default: float) -> HFField:
    """A float, as a strict config class types it (an integer is refused)."""
    return HFField((float,), default)


def real(default: float | None) -> HFField:
    """A number a config class does not type (taken from the config's extra keywords): integer or float."""
    return HFField((int, float), default)


def word(default: str) -> HFField:
    return HFField((str,), default)


def table() -> HFField:
    """An object, or null (absent: null)."""
    return HFField((dict, NoneType), None)


def revised(fields: Mapping[str, HFField], drop: tuple[str, ...] = (), **changed: HFField) -> dict[str, HFField]:
    """`fields` without `drop`, with `changed` replacing or adding fields."""
    return {**{k: v for k, v in fields.items() if k not in drop}, **changed}


class HFFields:
    """An HF config as a card reads it: attribute access to each declared field (config.json's value, else the
    default), after the card's `standardize`. Duck-types the transformers config the card functions also accept."""

    def __init__(self, values: Mapping[str, Any]):
        self.__dict__.update(values)

    def __repr__(self) -> str:
        return f"HFFields({self.__dict__})"


def read_fields(fields: Mapping[str, HFField], config: Mapping[str, Any],
                standardize: Callable[[dict[str, Any]], dict[str, Any]]) -> HFFields:
    """The card's reading of `config` (config.json's fields); ShardproofError naming the first bad field."""
    values = {}
    for name, spec in fields.items():
        value = config[name] if name in config else spec.default
        spec.check(name, value)
        values[name] = value
    return HFFields(standardize(values))
