"""Reports as JSON-safe data, from their dataclass fields: one function instead of a `to_json` per class."""

from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path
from typing import Any

from .metrics import json_float


def to_json(value: Any) -> Any:
    """`value` as JSON allows it.

    A dataclass becomes a dict of the properties it names in `JSON_PROPERTIES` (e.g. `passed`, `failures`), then
    its fields; a field's metadata `json` renames it. Non-finite floats become strings (`json_float`), tuples
    lists, Paths and enums their string values.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = {name: to_json(getattr(value, name)) for name in getattr(value, "JSON_PROPERTIES", ())}
        for f in dataclasses.fields(value):
            data[f.metadata.get("json", f.name)] = to_json(getattr(value, f.name))
        return data
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float):
        return json_float(value)
    return value
