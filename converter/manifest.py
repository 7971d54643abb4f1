"""The integrity manifest written beside the rank files: the tool version, the source's fingerprint and the
SHA-256 and size of every file the conversion wrote.

`shardproof-manifest.json` is written into the staging directory with the checkpoint, so both appear together;
rank files are hashed once complete (`rank_file_digests`, in parallel). Readers that load
`config.json` and `rank{N}.safetensors` by name (TensorRT-LLM's loader, its runtime) ignore it. `inspect`,
`reassemble` and `verify` check it first and name a corrupted, truncated or missing file; a checkpoint without
one (written by another tool) is accepted and noted.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.metadata
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .bounded_read import regular_file_size
from .errors import ShardproofError
from .json_files import read_json
from .source import Source, open_source

MANIFEST = "shardproof-manifest.json"
FORMAT = 1
_CHUNK = 8 * 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FileDigest:
    """A file's SHA-256 (hex) and size in bytes."""

    sha256: str
    size: int


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

        if data.get("format") != FORMAT:
            raise bad(f"format {data.get('format')!r}, expected {FORMAT}")
        if not isinstance(data.get("tool_version"), str):
            raise bad("tool_version is not a string")
        sections = {}
        for key in ("source", "files"):
            section = data.get(key)
            if not isinstance(section, dict):
                raise bad(f"{key!r} is not an object")
            sections[key] = {name: _digest(value, f"{key}[{name!r}]", bad) for name, value in section.items()}
        for name in sections["files"]:
            if name in ("", ".", "..") or "/" in name or "\0" in name:
                raise bad(f"files names {name!r}, not a file of the checkpoint directory")
        return cls(data["tool_version"], sections["source"], sections["files"])


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


def file_digest(path: Path) -> FileDigest:
    """SHA-256 and size of the regular file `path`, read in chunks."""
    regular_file_size(path)
    h, size = hashlib.sha256(), 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
    except OSError as e:
        raise ShardproofError(f"{path}: cannot read ({e.strerror})") from None
    return FileDigest(h.hexdigest(), size)


def rank_file_digests(directory: Path, workers: int = 1) -> dict[str, FileDigest]:
    """Each rank file's digest, read back once the conversion wrote it (its tensors are written out of order, in
    parallel, so the file is hashed whole afterwards; hashing releases the GIL, so `workers` files at a time)."""
    paths = sorted(Path(directory).glob("rank*.safetensors"))
    with concurrent.futures.ThreadPoolExecutor(max(workers, 1)) as pool:
        return dict(zip((p.name for p in paths), pool.map(file_digest, paths)))


def source_fingerprint(source: Source) -> dict[str, FileDigest]:
    """Digests of the files a conversion reads from the source: its config's and its weights' (`Source.files`)."""
    return {str(p.relative_to(source.model_dir)): file_digest(p) for p in source.files}


def write_manifest(directory: Path, source: dict[str, FileDigest], written: dict[str, FileDigest]) -> None:
    """Write the manifest of the checkpoint in `directory`: `written` (the rank files' digests) and config.json,
    hashed here."""
    files = {**written, "config.json": file_digest(directory / "config.json")}
    Manifest(importlib.metadata.version("shardproof"), source, dict(sorted(files.items()))).write(directory)


def check_manifest(checkpoint_dir: Path) -> ManifestCheck:
    """The checkpoint's files against its manifest, sizes first (a truncated file is named without hashing it)."""
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
        elif file_digest(file).sha256 != expected.sha256:
            check.problems[name] = "corrupted: its SHA-256 differs from the manifest's"
    for rank_path in sorted(directory.glob("rank*.safetensors")):
        if rank_path.name not in check.manifest.files:
            check.problems[rank_path.name] = "not written by the conversion (not in the manifest)"
    return check


def source_differences(manifest: Manifest, model_dir: Path) -> list[str]:
    """How `model_dir` differs from the source the checkpoint was converted from (empty: it is that source)."""
    current = source_fingerprint(open_source(model_dir))
    differences = [f"{name}: missing" for name in manifest.source if name not in current]
    differences += [f"{name}: SHA-256 or size differs" for name, digest in manifest.source.items()
                    if name in current and current[name] != digest]
    differences += [f"{name}: not in the source the checkpoint was converted from" for name in current if name not in manifest.source]
    return differences


def _digest(value: object, where: str, bad) -> FileDigest:
    if not (isinstance(value, dict) and isinstance(value.get("sha256"), str) and _SHA256.fullmatch(value["sha256"])
            and type(value.get("size")) is int and value["size"] >= 0):
        raise bad(f"{where} is not a SHA-256 and a size")
    return FileDigest(value["sha256"], value["size"])
