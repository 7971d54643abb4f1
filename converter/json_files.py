"""JSON files of a checkpoint directory, read with one-line errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ShardproofError


def read_json(path: Path) -> dict:
    """The JSON object in `path`, or ShardproofError naming the file and what is wrong with it."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ShardproofError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardproofError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ShardproofError(f"{path}: not a JSON object")
    return value


def read_config(directory: Path, kind: str) -> tuple[Path, dict]:
    """(path, contents) of `directory`/config.json; `kind` ("model", "checkpoint") names the directory in errors."""
    if not Path(directory).is_dir():
        raise ShardproofError(f"{directory}: {kind} directory not found")
    path = Path(directory) / "config.json"
    return path, read_json(path)
