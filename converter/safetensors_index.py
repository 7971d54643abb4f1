"""The weight files of an HF model directory: `model.safetensors`, or the shards its index names, all inside it
(the index reader serves HF's other weight indexes too)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ShardproofError
from .json_files import read_json
from .paths import resolved, within

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of `model_dir`, each refused if it is named or linked outside the directory."""
    if os.path.exists(model_dir / INDEX):
        return indexed_files(model_dir, model_dir / INDEX)
    if os.path.exists(model_dir / SINGLE):
        return [inside(model_dir, model_dir / SINGLE, SINGLE)]
    raise ShardproofError(f"{model_dir}: no {SINGLE} or {INDEX} (only safetensors checkpoints are converted)")


def indexed_files(model_dir: Path, index: Path) -> list[Path]:
    """The weight files an HF index (`weight_map`: tensor -> file name) names, in order of first mention, each
    refused if it is named or linked outside `model_dir` or does not exist."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ShardproofError(f"{index}: not a weight index (no weight_map)")
    for tensor, name in weight_map.items():
        if not isinstance(name, str):
            raise ShardproofError(f"{index}: weight_map[{tensor!r}] is {name!r}, not a file name")
    files = [inside(model_dir, index, name) for name in dict.fromkeys(weight_map.values())]
    missing = [repr(f.name) for f in files if not os.path.exists(f)]
    if missing:
        raise ShardproofError(f"{index}: names shard(s) that do not exist: {', '.join(missing)}")
    return files


def inside(model_dir: Path, where: Path, name: str) -> Path:
    """model_dir/`name`, refused when it names or links to a file outside the model directory.

    A HuggingFace hub snapshot (`models--*/snapshots/<rev>`) links its files into the repository's `blobs/`,
    which therefore counts as inside.
    """
    if not name or "\0" in name:
        raise ShardproofError(f"{where}: weight file {name!r} is not a file name")
    path = model_dir / name
    root = resolved(model_dir)
    roots = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    if Path(name).is_absolute() or ".." in Path(name).parts or not any(within(path, r) for r in roots):
        raise ShardproofError(f"{where}: weight file {name!r} lies outside the model directory {model_dir}")
    return path
