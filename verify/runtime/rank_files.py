"""A checkpoint directory's rank files: which tensors each rank holds, and checked access to them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from shardproof.converter.card import Shape
from shardproof.converter.dtypes import from_safetensors_code
from shardproof.converter.errors import ShardproofError
from shardproof.converter.safetensors_io import TensorReader

from ..rank_reads import RankReads, rank_key
from .config import RuntimeConfig, load_config
from .family import Family, get_family

LAYER_PREFIX = "transformer.layers.{}."  # layer names are local to the stage: 0 .. len(stage_layers) - 1


def rank_tensors(cfg: RuntimeConfig, rank: int, first: dict[str, Shape], layer: dict[str, Shape],
                 last: dict[str, Shape]) -> dict[str, Shape]:
    """Every tensor of ``rank{rank}.safetensors``: ``first`` on the first stage, ``layer`` once per layer of
    the rank's stage (under ``LAYER_PREFIX``), ``last`` on the last stage."""
    pp_rank = rank // cfg.tp_size
    out = dict(first) if pp_rank == 0 else {}
    for j in range(len(cfg.stage_layers(pp_rank))):
        out |= {LAYER_PREFIX.format(j) + name: shape for name, shape in layer.items()}
    if pp_rank == cfg.pp_size - 1:
        out |= last
    return out


def pinned_dtypes(family: Family, cfg: RuntimeConfig, rank: int) -> dict[str, torch.dtype]:
    """The tensors of ``rank`` that its family keeps in a dtype of their own (``Family.dtypes``, optional;
    e.g. a float32 router), by full name."""
    dtypes = getattr(family, "dtypes", None)
    return dtypes(cfg, rank) if dtypes else {}


class RankFile:
    """One rank file, its header read and validated up front, each tensor's data read only when asked for
    (plain reads, no mmap: memory holds only the tensors in use)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._reader = TensorReader(path)  # judged exactly as convert and reassemble judge it
        except ShardproofError as e:
            raise ValueError(f"{path}: unreadable safetensors file ({e})") from None
        self.shapes: dict[str, Shape] = {name: tuple(e.shape) for name, e in self._reader.entries.items()}

    def dtype(self, name: str) -> torch.dtype | str:
        """The stored dtype of ``name`` (its safetensors code when torch has none)."""
        code = self._reader.entries[name].dtype
        try:
            return from_safetensors_code(code)
        except ShardproofError:
            return code

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def read(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Tensor:
        """The data of ``name`` on ``device``, cast to ``dtype`` (None: as stored) as it is read from the file."""
        try:
            return self._reader.read_to(name, torch.device(device), dtype)
        except ShardproofError as e:
            raise ValueError(str(e)) from None


class SharedReads:
    """Rank tensors read once, as stored, and kept until ``clear()``: runs stepping through the same stage together
    (``teacher.StageRunner``) each take their own cast of one read. With ``across``, the reads of another reader
    of the same files (the rebuilt model of ``--mode both``, ``verify/rank_reads.py``) serve here too."""

    def __init__(self, across: RankReads | None = None) -> None:
        self._tensors: dict[tuple[Path, str], Tensor] = {}
        self.across = across

    def get(self, file: RankFile, name: str, device: torch.device | str) -> Tensor:
        key = (file.path, name)
        if key not in self._tensors:
            self._tensors[key] = (file.read(name, device) if self.across is None else
                                  self.across.read(rank_key(file.path, name, device), lambda: file.read(name, device)))
        return self._tensors[key]

    def clear(self) -> None:
        self._tensors.clear()


@dataclass(frozen=True, eq=False)
class RankWeights:
    """Read-only view of one rank file: ``w[name]`` checks name, shape and dtype from the header, then reads
    the tensor and casts it (a tensor in ``pinned`` is checked against its own dtype and kept in it). Nothing is
    cached unless ``reads`` is given: then each tensor is read once into it, and cast from there."""

    path: Path
    file: RankFile
    expected: dict[str, Shape]
    stored_dtype: torch.dtype
    tp_rank: int
    device: torch.device | str
    dtype: torch.dtype
    prefix: str = ""
    pinned: Mapping[str, torch.dtype] = field(default_factory=dict)
    reads: SharedReads | None = None

    def __getitem__(self, name: str) -> Tensor:
        full, dtype = self._checked(name)
        return self._read(full, dtype)

    def rows(self, name: str, index: Tensor) -> Tensor:
        """``F.embedding(index, self[name])``, the rows gathered from the stored table before the cast: the same
        values, without the whole table in the compute dtype."""
        full, dtype = self._checked(name)
        rows = F.embedding(index, self._read(full, None))
        return rows if dtype is None else rows.to(dtype)

    def shape(self, name: str) -> Shape:
        return self.file.shapes[self._checked(name)[0]]

    def _checked(self, name: str) -> tuple[str, torch.dtype | None]:
        """The full name of a tensor whose header matches the layout, and the dtype to cast it to (None: kept)."""
        full = self.prefix + name
        if full not in self.file:
            raise ValueError(f"{self.path}: missing tensor '{full}'")
        shape, dtype = self.file.shapes[full], self.file.dtype(full)
        if full in self.expected and shape != self.expected[full]:
            raise ValueError(f"{self.path}: tensor '{full}' has shape {list(shape)}, "
                             f"expected {list(self.expected[full])}")
        if full in self.pinned:
            if dtype != self.pinned[full]:
                raise ValueError(f"{self.path}: tensor '{full}' is {dtype}, expected {self.pinned[full]}")
            return full, None
        if dtype != self.stored_dtype:
            raise ValueError(f"{self.path}: tensor '{full}' is {dtype}, config says {self.stored_dtype}")
        return full, self.dtype

    def _read(self, full: str, dtype: torch.dtype | None) -> Tensor:
        if self.reads is None:
            return self.file.read(full, self.device, dtype)
        stored = self.reads.get(self.file, full, self.device)
        return stored if dtype is None else stored.to(dtype)

    def scope(self, prefix: str) -> RankWeights:
        """The same file with ``prefix`` prepended to every name."""
        return dataclasses.replace(self, prefix=self.prefix + prefix)


class ShardedCheckpoint:
    """A TensorRT-LLM checkpoint directory: parsed config, the family forward that runs it, and rank files
    whose headers are read once and whose tensors are read when a layer asks for them."""

    def __init__(self, checkpoint_dir: str | Path) -> None:
        self.path = Path(checkpoint_dir)
        if not self.path.is_dir():
            raise ValueError(f"{self.path}: checkpoint directory does not exist")
        self.config = load_config(self.path / "config.json")
        self.family: Family = get_family(self.config.forward)
        self._files: dict[int, RankFile] = {}

    def rank_path(self, rank: int) -> Path:
        return self.path / f"rank{rank}.safetensors"

    def file(self, rank: int) -> RankFile:
        """``rank{rank}.safetensors``, its header read on first use, then kept."""
        if not 0 <= rank < self.config.world_size:
            raise ValueError(f"{self.path}: rank {rank} outside world_size {self.config.world_size}")
        if rank not in self._files:
            path = self.rank_path(rank)
            if not path.is_file():
                raise ValueError(f"{path}: missing rank file")
            self._files[rank] = RankFile(path)
        return self._files[rank]

    def weights(self, rank: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                reads: SharedReads | None = None) -> RankWeights:
        """Checked view of one rank's tensors, cast to ``dtype`` (default: checkpoint dtype), read through
        ``reads`` when given."""
        cfg = self.config
        return RankWeights(self.rank_path(rank), self.file(rank), self.family.tensors(cfg, rank),
                           cfg.dtype, rank % cfg.tp_size, device, dtype or cfg.dtype,
                           pinned=pinned_dtypes(self.family, cfg, rank), reads=reads)

    def validate(self, ranks: Sequence[int] | None = None) -> None:
        """Fail on any missing, unexpected, misshapen or wrongly typed tensor in the rank files (from their
        headers; no data is read)."""
        cfg = self.config
        for rank in range(cfg.world_size) if ranks is None else ranks:
            path, found, expected = self.rank_path(rank), self.file(rank), self.family.tensors(cfg, rank)
            if missing := sorted(set(expected) - set(found.shapes)):
                raise ValueError(f"{path}: missing tensor(s) {missing}")
            if extra := sorted(set(found.shapes) - set(expected)):
                raise ValueError(f"{path}: unexpected tensor(s) {extra}")
            pinned = pinned_dtypes(self.family, cfg, rank)
            for name, shape in expected.items():
                if found.shapes[name] != shape:
                    raise ValueError(f"{path}: tensor '{name}' has shape {list(found.shapes[name])}, "
                                     f"expected {list(shape)}")
                if found.dtype(name) != pinned.get(name, cfg.dtype):
                    raise ValueError(f"{path}: tensor '{name}' is {found.dtype(name)}, "
                                     f"expected {pinned.get(name, cfg.dtype)}")
