"""JSON files of a checkpoint directory, read with one-line errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

from .bounded_read import read_bounded
from .errors import ShardproofError

# config.json and model.safetensors.index.json are kilobytes; the largest real indexes are a few MB.
MAX_JSON_BYTES = 64 * 1024 * 1024


def read_json(path: Path) -> dict:
    """The JSON object in `path`, or ShardproofError naming the file and what is wrong with it."""
    raw = read_bounded(Path(path), MAX_JSON_BYTES)
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ShardproofError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise ShardproofError(f"{path}: not valid JSON ({e})") from None
    except (ValueError, RecursionError) as e:  # integers beyond Python's digit limit, nesting beyond the stack
        raise ShardproofError(f"{path}: not valid JSON ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise ShardproofError(f"{path}: not a JSON object")
    return value


def read_config(directory: Path, kind: str) -> tuple[Path, dict]:
    """(path, contents) of `directory`/config.json; `kind` ("model", "checkpoint") names the directory in errors."""
    if not Path(directory).is_dir():
        raise ShardproofError(f"{directory}: {kind} directory not found")
    path = Path(directory) / "config.json"
    return path, read_json(path)
