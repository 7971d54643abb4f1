"""`rank{N}.json`: what a rank file of a target without TensorRT-LLM's config.json says about itself.

Written beside `rank{N}.safetensors` by `convert --target trtllm-pytorch` and by `shardproof.capture.dump_rank`
(each rank writes its own, so no rank waits for another): the target, the rank's place in the mapping, the dtype,
the source model's fingerprint (converter/manifest.py) and, when known, the source's HF config.json. With the HF
model's config these are enough to plan the layout every rank must hold.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .dtypes import TORCH_DTYPES
from .errors import ShardproofError
from .json_files import read_json
from .manifest import FileDigest, read_digest
from .mapping import Mapping

FORMAT = 2  # 1: the source's digests as manifests of format 2 hold them (SHA-256); 2: as format 3 (BLAKE3)


def metadata_file(rank: int) -> str:
    return f"rank{rank}.json"


@dataclass(frozen=True)
class RankMetadata:
    """One rank's `rank{N}.json`. `source`: the source's fingerprint (file -> digest), empty when not known;
    `hf_config`: the source's config.json, None when not known; `moe_tp_size` / `moe_ep_size`: the experts' split of
    the TP group (converter/mapping.py; None: TensorRT-LLM's defaults)."""

    target: str
    dtype: str
    tp_size: int
    pp_size: int
    rank: int
    tp_rank: int
    pp_rank: int
    source: dict[str, FileDigest]
    hf_config: dict[str, Any] | None = None
    moe_tp_size: int | None = None
    moe_ep_size: int | None = None
    format: int = FORMAT

    def __post_init__(self) -> None:
        mapping = self.mapping
        if not 0 <= self.rank < mapping.world_size or mapping.coords(self.rank) != (self.tp_rank, self.pp_rank):
            raise ShardproofError(f"rank {self.rank} is not (tp_rank {self.tp_rank}, pp_rank {self.pp_rank}) of "
                                  f"tp_size={self.tp_size}, pp_size={self.pp_size}")
        if self.dtype not in TORCH_DTYPES:
            raise ShardproofError(f"dtype {self.dtype!r} is not one of {', '.join(TORCH_DTYPES)}")

    @property
    def mapping(self) -> Mapping:
        return Mapping(self.tp_size, self.pp_size, self.moe_tp_size, self.moe_ep_size)

    def write(self, directory: Path) -> Path:
        path = Path(directory) / metadata_file(self.rank)
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, path: Path) -> "RankMetadata":
        """The metadata in `path`, or ShardproofError naming the file and what is wrong."""
        data = read_json(path)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        try:
            if unknown:
                raise ShardproofError(f"unknown field(s) {', '.join(unknown)}")
            for key in ("tp_size", "pp_size", "rank", "tp_rank", "pp_rank", "format", "moe_tp_size", "moe_ep_size"):
                if data.get(key) is not None and (type(data[key]) is not int):
                    raise ShardproofError(f"{key}={data[key]!r} must be an integer")
            if data.get("format", FORMAT) not in (1, FORMAT):
                raise ShardproofError(f"format {data['format']!r} is not 1 or {FORMAT}")
            source = data.get("source", {})
            if not isinstance(source, dict) or not all(isinstance(d, dict) for d in source.values()):
                raise ShardproofError("'source' must map file names to digests")
            if data.get("hf_config") is not None and not isinstance(data["hf_config"], dict):
                raise ShardproofError("'hf_config' must be an object")
            digests = data.get("format", FORMAT) + 1  # the manifest format whose digests this format holds
            return cls(**{**data, "source": {k: read_digest(v, digests, f"source[{k!r}]", ShardproofError)
                                             for k, v in source.items()}})
        except TypeError as e:  # a missing field
            raise ShardproofError(f"{path}: not a valid rank metadata file ({e})") from None
        except ShardproofError as e:
            raise ShardproofError(f"{path}: {e}") from None


def read_rank_metadata(directory: Path, target: str) -> list[RankMetadata]:
    """Every rank's metadata in `directory`, one per rank of the mapping rank 0 declares, all agreeing on the
    target, the mapping, the dtype and the source; ShardproofError naming the file that does not."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ShardproofError(f"{directory}: checkpoint directory not found")
    first_path = directory / metadata_file(0)
    if not first_path.exists():
        raise ShardproofError(f"{first_path}: missing (a {target} checkpoint has one rank{{N}}.json per rank)")
    first = RankMetadata.read(first_path)
    found = [first]
    for rank in range(1, first.mapping.world_size):
        path = directory / metadata_file(rank)
        if not path.exists():
            raise ShardproofError(f"{path}: missing (rank0.json declares world size {first.mapping.world_size})")
        found.append(RankMetadata.read(path))
    for meta in found:
        path = directory / metadata_file(meta.rank)
        if meta.rank != found.index(meta):
            raise ShardproofError(f"{path}: says rank {meta.rank}")
        if meta.target != target:
            raise ShardproofError(f"{path}: target {meta.target!r}, expected {target!r}")
        for key in ("tp_size", "pp_size", "moe_tp_size", "moe_ep_size", "dtype", "source"):
            if getattr(meta, key) != getattr(first, key):
                raise ShardproofError(f"{path}: {key} differs from rank0.json's")
    return found
