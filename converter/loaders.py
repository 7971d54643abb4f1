"""The components that read a source checkpoint, each registered under a name: the extension API for formats.

A checkpoint format is a `CheckpointLoader` naming a `ConfigLoader` (source config -> `SourceConfig`, the model
description the cards read) and a `WeightLoader` (a directory -> `Weights`, lazy tensor access). The per-architecture
weight mapper is the architecture card (`converter/card.py`): it maps the tensor names any format presents.
`converter/source.py` opens a directory with the first registered checkpoint loader that claims it.
docs/extending.md states each contract.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, TypeVar

import torch

from .errors import ShardproofError
from .registry import Registry

Shape = tuple[int, ...]


@dataclass(frozen=True)
class SourceConfig:
    """What a config loader returns.

    `fields`: every field of the source config under HF's config.json names (the card accounts for each one; an
    unknown field is refused; a card with `hf_fields` reads its values from here); `files`: the files read, the
    first named in errors (the integrity manifest fingerprints them all); `parse()`: a transformers
    `PretrainedConfig` of the model, or ShardproofError naming the file (what verify builds the HF-side model from,
    and what a card without `hf_fields` reads), called once, when first needed: `convert` of a card that reads its
    fields itself never imports transformers."""

    fields: Mapping[str, Any]
    files: tuple[Path, ...]
    parse: Callable[[], Any]

    @cached_property
    def hf_config(self) -> Any:
        """transformers' parse of the config (`parse()`, once)."""
        return self.parse()

    @property
    def architecture(self) -> str:
        """The one architecture named by the `architectures` field."""
        names = self.fields.get("architectures")
        if not (isinstance(names, list) and len(names) == 1 and isinstance(names[0], str)):
            raise ShardproofError(f"{self.files[0]}: 'architectures' must be a list naming exactly one architecture")
        return names[0]


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's dtype and shape, known without reading its data."""

    dtype: torch.dtype
    shape: Shape

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Weights(ABC):
    """One checkpoint's tensors, opened by a weight loader: names, dtypes and shapes from metadata alone, data
    on demand.

    `tensors` lists every tensor the checkpoint holds under the checkpoint's own names; `files` every file
    read (the manifest fingerprints them). `load(name)` returns a CPU tensor of exactly `tensors[name]`'s dtype
    and shape (`Source.load` checks), or raises ShardproofError naming the file; it may be called from several
    threads at once."""

    tensors: Mapping[str, TensorInfo]
    files: tuple[Path, ...]

    @abstractmethod
    def where(self, name: str) -> Path:
        """The file that holds tensor `name` (named in errors)."""

    @abstractmethod
    def load(self, name: str) -> torch.Tensor:
        """Tensor `name`'s data in its stored dtype."""

    def load_to(self, name: str, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Optional: tensor `name` on `device`, cast to `dtype` (None: as stored). Default: `load(name)` moved and
        cast; a loader may read straight into device memory and cast as it reads instead (the safetensors loader
        does, a pinned buffer at a time)."""
        tensor = self.load(name).to(device)
        return tensor if dtype is None else tensor.to(dtype)

    def blocks(self, name: str, block_bytes: int) -> Iterator[torch.Tensor] | None:
        """Optional: tensor `name`'s bytes as stored (uint8), `block_bytes` at a time (the last block shorter), each
        block valid until the next is asked for; with digests recorded, the tensor's digest is recorded once its last
        block is read. Default None: the loader reads whole tensors only (`Source.blocks` then cuts `load`'s)."""
        return None

    def record_digests(self) -> dict[Path, dict[str, bytes]]:
        """Optional: from now on, record the digest of each tensor's bytes as `load` reads them from a safetensors
        file (`digests.part_digest`), in the mapping returned (file -> tensor name -> digest, filled as tensors are
        read), so that the manifest need not read them again. Default: none recorded (an empty mapping)."""
        return {}


class ConfigLoader(ABC):
    """Reads a checkpoint's config into a `SourceConfig`; ShardproofError naming the file when it cannot."""

    @abstractmethod
    def load(self, model_dir: Path) -> SourceConfig: ...


class WeightLoader(ABC):
    """Opens a checkpoint's tensors. `expects` says, for errors, which files it reads."""

    expects: ClassVar[str]

    @abstractmethod
    def claims(self, model_dir: Path) -> bool:
        """Whether `model_dir` holds this loader's files, from their names alone (nothing parsed)."""

    @abstractmethod
    def open(self, model_dir: Path) -> Weights:
        """The directory's tensors; ShardproofError naming the file for anything unreadable or inconsistent."""


class CheckpointLoader:
    """A checkpoint format: the registered config loader and weight loader (by name) that read it.

    `claims` defaults to the weight loader's. `transformers_reads_directory`: transformers' `from_pretrained`
    reads the directory itself (so verify loads the HF-side model from it); otherwise verify builds the model from
    `hf_config` and the tensors `Weights` gives."""

    config_loader: ClassVar[str]
    weight_loader: ClassVar[str]
    transformers_reads_directory: ClassVar[bool] = False

    def claims(self, model_dir: Path) -> bool:
        return WEIGHT_LOADERS.get(self.weight_loader).claims(model_dir)

    def open(self, model_dir: Path) -> tuple[SourceConfig, Weights]:
        """The directory's config, then its tensors."""
        config = CONFIG_LOADERS.get(self.config_loader).load(model_dir)
        return config, WEIGHT_LOADERS.get(self.weight_loader).open(model_dir)


CONFIG_LOADERS: Registry[ConfigLoader] = Registry("config loader")
WEIGHT_LOADERS: Registry[WeightLoader] = Registry("weight loader")
CHECKPOINT_LOADERS: Registry[CheckpointLoader] = Registry("checkpoint format")

C = TypeVar("C", bound=type)


def _registering(registry: Registry, name: str) -> Callable[[C], C]:
    def decorate(cls: C) -> C:
        registry.add(name, cls(), cls.__module__)
        return cls

    return decorate


def register_config_loader(name: str) -> Callable[[C], C]:
    """Class decorator: register an instance of a `ConfigLoader` subclass as `name`."""
    return _registering(CONFIG_LOADERS, name)


def register_weight_loader(name: str) -> Callable[[C], C]:
    """Class decorator: register an instance of a `WeightLoader` subclass as `name`."""
    return _registering(WEIGHT_LOADERS, name)


def register_checkpoint_loader(name: str) -> Callable[[C], C]:
    """Class decorator: register an instance of a `CheckpointLoader` subclass as checkpoint format `name`; formats
    are tried in registration order (built-ins first), the first that claims a directory reads it."""
    return _registering(CHECKPOINT_LOADERS, name)
