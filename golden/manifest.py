"""A golden manifest: a conversion's metadata (config.json, or for a target without one every rank{N}.json less what
only describes the source) and, per rank, every tensor's name, shape, dtype and SHA-256.

Manifests are small JSON text files, one tensor per line so that a review diff shows exactly what moved.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardproof.converter.json_files import read_json
from shardproof.converter.rank_metadata import metadata_file
from shardproof.converter.safetensors_io import raw_tensors
from shardproof.converter.target import Target

ABSENT = "(absent)"  # a config key on one side only
# rank{N}.json fields that describe the source, not the conversion: its fingerprint and its config.json, both
# carrying the transformers version that wrote the golden source model
SOURCE_FIELDS = ("source", "hf_config")
DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass(frozen=True)
class TensorEntry:
    shape: tuple[int, ...]
    dtype: str
    sha256: str

    def __str__(self) -> str:
        return f"{list(self.shape)} {self.dtype} {self.sha256[:12]}"


@dataclass(frozen=True)
class Manifest:
    """What one golden case's conversion wrote: `config` its metadata (`checkpoint_metadata`),
    `ranks[rank][tensor name]` its tensors."""

    case: str
    source: dict[str, Any]  # how the source model was made: architecture, seed, config overrides
    layout: dict[str, Any]
    config: dict[str, Any]
    ranks: dict[int, dict[str, TensorEntry]]

    @classmethod
    def of_checkpoint(cls, checkpoint_dir: Path, case: str, source: dict, layout: dict, target: Target) -> "Manifest":
        """The manifest of a directory converted into `target`: its metadata and rank{N}.safetensors."""
        ranks = {}
        for path in checkpoint_dir.glob("rank*.safetensors"):
            ranks[int(path.stem.removeprefix("rank"))] = {
                name: TensorEntry(shape, DTYPE_NAMES.get(code, code), hashlib.sha256(data).hexdigest())
                for name, (code, shape, data) in sorted(raw_tensors(path).items())
            }
        return cls(case, source, layout, checkpoint_metadata(checkpoint_dir, target, len(ranks)), dict(sorted(ranks.items())))

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        data = read_json(path)
        ranks = {
            int(rank): {name: TensorEntry(tuple(e["shape"]), e["dtype"], e["sha256"]) for name, e in tensors.items()}
            for rank, tensors in data["ranks"].items()
        }
        return cls(data["case"], data["source"], data["layout"], data["config"], ranks)

    def dumps(self) -> str:
        """Indented JSON with each tensor on one line."""
        head = {"case": self.case, "source": self.source, "layout": self.layout, "config": self.config}
        text = json.dumps(head, indent=2, sort_keys=True)[:-2]  # reopen the object to append "ranks"
        ranks = []
        for rank, tensors in self.ranks.items():
            lines = [f'      {json.dumps(name)}: {json.dumps(dict(shape=list(e.shape), dtype=e.dtype, sha256=e.sha256))}'
                     for name, e in tensors.items()]
            ranks.append(f'    "{rank}": {{\n' + ",\n".join(lines) + "\n    }")
        return text + ',\n  "ranks": {\n' + ",\n".join(ranks) + "\n  }\n}\n"


def checkpoint_metadata(checkpoint_dir: Path, target: Target, world_size: int) -> dict[str, Any]:
    """What a conversion says about itself: config.json, or for a target without one `{"rank{N}.json": ...}` less
    the fields that describe the source (SOURCE_FIELDS)."""
    if target.trt_config:
        return read_json(checkpoint_dir / "config.json")
    return {
        name: {k: v for k, v in read_json(checkpoint_dir / name).items() if k not in SOURCE_FIELDS}
        for name in map(metadata_file, range(world_size))
    }


@dataclass(frozen=True)
class TensorChange:
    """A tensor of one rank that differs from the manifest: changed, missing (in the manifest only) or extra."""

    rank: int
    name: str
    kind: str
    expected: TensorEntry | None
    actual: TensorEntry | None


@dataclass(frozen=True)
class ConfigChange:
    key: str  # dotted path into config.json
    expected: Any
    actual: Any


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def compare(expected: Manifest, actual: Manifest) -> tuple[list[TensorChange], list[ConfigChange]]:
    """Every tensor that changed, is missing or is extra, rank by rank, and every config.json key that changed."""
    tensors = []
    for rank in sorted(expected.ranks.keys() | actual.ranks.keys()):
        want, got = expected.ranks.get(rank, {}), actual.ranks.get(rank, {})
        for name in sorted(want.keys() | got.keys()):
            kind = "missing" if name not in got else "extra" if name not in want else "changed"
            if kind != "changed" or want[name] != got[name]:
                tensors.append(TensorChange(rank, name, kind, want.get(name), got.get(name)))
    old, new = _flatten(expected.config), _flatten(actual.config)
    config = [ConfigChange(key, old.get(key, ABSENT), new.get(key, ABSENT))
              for key in sorted(old.keys() | new.keys()) if old.get(key, ABSENT) != new.get(key, ABSENT)]
    return tensors, config
