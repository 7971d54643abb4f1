"""The integrity manifest written beside the rank files: the tool version, the source's fingerprint and the
digest and size of every file the conversion wrote (converter/digests.py says how files are hashed).

`shardproof-manifest.json` is written into the staging directory with the checkpoint, so both appear together;
the rank files' digests come from the bytes as they were written, the source's from the bytes as they were read
(tensors the conversion skipped are read for it). Readers that load
`config.json` and `rank{N}.safetensors` by name (TensorRT-LLM's loader, its runtime) ignore it. `inspect`,
`reassemble` and `verify` check it first and name a corrupted, truncated or missing file; a checkpoint without
one (written by another tool) is accepted and noted.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from .bounded_pool import default_workers
from .bounded_read import regular_file_size
from .digests import SCHEMES, FileDigest, file_digest
from .errors import ShardproofError
from .json_files import read_json
from .source import Source, open_source

MANIFEST = "shardproof-manifest.json"
# 1: every file's SHA-256, whole; 2: each digest names its scheme (SHA-256); 3: BLAKE3 (converter/digests.py).
# All three are read and checked; a conversion writes 3.
FORMAT = 3
_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Manifest:
    """What a conversion wrote (`files`: checkpoint file name -> digest) from which source (`source`: path
    relative to the model directory -> digest, config.json included), by which shardproof version."""

    tool_version: str
    source: dict[str, FileDigest]
    files: dict[str, FileDigest]
    format: int = FORMAT

    def write(self, directory: Path) -> None:
        (directory / MANIFEST).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, path: Path) -> "Manifest":
        """The manifest at `path`, or ShardproofError naming the file and what is malformed."""
        data = read_json(path)

        def bad(problem: str) -> ShardproofError:
            return ShardproofError(f"{path}: not a valid shardproof manifest ({problem})")

        if data.get("format") not in (1, 2, FORMAT):
            raise bad(f"format {data.get('format')!r}, expected 1, 2 or {FORMAT}")
        if not isinstance(data.get("tool_version"), str):
            raise bad("tool_version is not a string")
        sections = {}
        for key in ("source", "files"):
            section = data.get(key)
            if not isinstance(section, dict):
                raise bad(f"{key!r} is not an object")
            sections[key] = {name: read_digest(value, data["format"], f"{key}[{name!r}]", bad)
                             for name, value in section.items()}
        for name in sections["files"]:
            if name in ("", ".", "..") or "/" in name or "\0" in name:
                raise bad(f"files names {name!r}, not a file of the checkpoint directory")
        return cls(data["tool_version"], sections["source"], sections["files"], data["format"])


@dataclass
class ManifestCheck:
    """The checkpoint's files against its manifest: `manifest` None when there is none; `problems` maps each
    file that differs (corrupted, truncated, missing, unlisted rank file) to what is wrong."""

    manifest: Manifest | None
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line: what was checked and found."""
        if self.manifest is None:
            return f"no {MANIFEST}: the files were not checked against a manifest (written by another tool?)"
        if self.problems:
            return "; ".join(f"{name}: {problem}" for name, problem in self.problems.items())
        return f"{len(self.manifest.files)} file(s) match {MANIFEST} (written by shardproof {self.manifest.tool_version})"


def source_fingerprint(source: Source, known: Mapping[Path, Mapping[str, bytes]] | None = None,
                       workers: int = 1) -> dict[str, FileDigest]:
    """Digests of the files a conversion reads from the source (`Source.files`: its config's and its weights'),
    reusing `known` tensor digests (`Source.record_digests`, taken as the conversion read them)."""
    known = known or {}
    return {str(p.relative_to(source.model_dir)): file_digest(p, known=known.get(p), workers=workers)
            for p in source.files}


def write_manifest(directory: Path, source: dict[str, FileDigest], written: dict[str, FileDigest]) -> None:
    """Write the manifest of the checkpoint in `directory`: `written` (the rank files' digests, taken as they were
    written) and the metadata beside them (config.json, or each rank's rank{N}.json), hashed here."""
    metadata = [directory / "config.json"] if (directory / "config.json").exists() else []
    metadata += sorted(directory.glob("rank*.json"))
    files = {**written, **{path.name: file_digest(path) for path in metadata}}
    Manifest(importlib.metadata.version("shardproof"), source, dict(sorted(files.items()))).write(directory)


def check_manifest(checkpoint_dir: Path, contents: bool = True) -> ManifestCheck:
    """The checkpoint's files against its manifest, sizes first (a truncated file is named without hashing it);
    `contents` False checks presence and sizes alone, reading no data."""
    directory = Path(checkpoint_dir)
    path = directory / MANIFEST
    if not os.path.lexists(path):
        return ManifestCheck(None)
    check = ManifestCheck(Manifest.read(path))
    for name, expected in check.manifest.files.items():
        file = directory / name
        if not os.path.lexists(file):
            check.problems[name] = "missing (the manifest lists it)"
            continue
        size = regular_file_size(file)
        if size != expected.size:
            shorter = "truncated: " if size < expected.size else ""
            check.problems[name] = f"{shorter}{size} bytes, the manifest says {expected.size}"
        elif contents and (problem := _corruption(file, expected)) is not None:
            check.problems[name] = problem
    for rank_path in sorted(directory.glob("rank*.safetensors")):
        if rank_path.name not in check.manifest.files:
            check.problems[rank_path.name] = "not written by the conversion (not in the manifest)"
    return check


def source_differences(manifest: Manifest, model_dir: Path) -> list[str]:
    """How `model_dir` differs from the source the checkpoint was converted from (empty: it is that source)."""
    model_dir = Path(model_dir)
    current = {name: _source_digest(model_dir / name, digest) for name, digest in manifest.source.items()}
    differences = [f"{name}: missing" for name, digest in current.items() if digest is None]
    differences += [f"{name}: {digest.scheme} digest or size differs" for name, digest in manifest.source.items()
                    if current[name] is not None and current[name] != digest]
    read = [str(p.relative_to(model_dir)) for p in open_source(model_dir).files]
    differences += [f"{name}: not in the source the checkpoint was converted from" for name in read if name not in manifest.source]
    return differences


def _source_digest(path: Path, expected: FileDigest) -> FileDigest | None:
    """`path`'s digest under the scheme of `expected`; None when it is missing; a changed safetensors header
    (no longer parses) counts as a difference."""
    if not os.path.lexists(path):
        return None
    try:
        return file_digest(path, expected.scheme, workers=default_workers())
    except ShardproofError:
        return FileDigest("", -1, expected.scheme)


def _corruption(file: Path, expected: FileDigest) -> str | None:
    """What is wrong with `file`, of the size the manifest gives, against its digest (None: nothing)."""
    try:
        digest = file_digest(file, expected.scheme, workers=default_workers())
    except ShardproofError as e:  # a safetensors header that no longer parses: the bytes were changed
        return f"corrupted: {e}"
    if digest.digest != expected.digest:
        return f"corrupted: its {expected.scheme} digest differs from the manifest's"
    return None


def read_digest(value: object, format: int, where: str, bad: Callable[[str], Exception]) -> FileDigest:
    """A file digest as a manifest (or a rank's metadata) of `format` stores it: {"digest" ("sha256" before format
    3), "size", "scheme" (none in format 1: SHA-256 whole)}; `bad(problem)` is raised when it is not one."""
    if not isinstance(value, dict):
        raise bad(f"{where} is not an object")
    key = "digest" if format >= 3 else "sha256"
    schemes = SCHEMES if format >= 3 else ("sha256", "safetensors-sha256")
    scheme = value.get("scheme", "sha256") if format > 1 else "sha256"
    if not (isinstance(value.get(key), str) and _HEX.fullmatch(value[key])
            and type(value.get("size")) is int and value["size"] >= 0 and scheme in schemes):
        raise bad(f"{where} is not a digest ({key!r}, 64 hex digits), a size"
                  + (f" and a scheme ({', '.join(schemes)})" if format > 1 else ""))
    return FileDigest(value[key], value["size"], scheme)
