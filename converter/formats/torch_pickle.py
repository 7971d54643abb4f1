"""PyTorch pickle checkpoints (`pytorch_model.bin`, its sharded index, or `*.pth` files) with an HF config.json,
read only with the user's consent (`--allow-pickle`): `torch.load(weights_only=True, mmap=True)`, which unpickles
nothing but tensors and plain containers and maps the data instead of reading it."""

from __future__ import annotations

import contextlib
import contextvars
import os
from pathlib import Path
from typing import Iterator

import torch

from ..errors import ShardproofError
from ..loaders import (CheckpointLoader, TensorInfo, WeightLoader, Weights, register_checkpoint_loader,
                       register_weight_loader)
from ..safetensors_index import indexed_files, inside

BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
PTH = ".pth"

_ALLOWED = contextvars.ContextVar("shardproof_pickle_allowed", default=False)


@contextlib.contextmanager
def pickle_allowed(allowed: bool = True) -> Iterator[None]:
    """Within the block, pickle checkpoints may be opened (the CLI's `--allow-pickle`)."""
    token = _ALLOWED.set(allowed)
    try:
        yield
    finally:
        _ALLOWED.reset(token)


def pickle_files(model_dir: Path) -> list[Path]:
    """The index's shards, else `pytorch_model.bin`, else every `*.pth` file of the directory (sorted)."""
    if os.path.exists(model_dir / BIN_INDEX):
        return [model_dir / BIN_INDEX, *indexed_files(model_dir, model_dir / BIN_INDEX)]
    if os.path.exists(model_dir / BIN):
        return [inside(model_dir, model_dir / BIN, BIN)]
    return [inside(model_dir, model_dir, p.name) for p in sorted(model_dir.glob(f"*{PTH}"))]


class PickleWeights(Weights):
    def __init__(self, model_dir: Path):
        self.files = tuple(pickle_files(model_dir))
        self._tensors: dict[str, torch.Tensor] = {}
        self._files: dict[str, Path] = {}
        for path in self.files:
            if path.name == BIN_INDEX:
                continue
            for name, tensor in _state_dict(path).items():
                if name in self._tensors:
                    raise ShardproofError(f"{path}: tensor {name} also appears in {self._files[name].name}")
                self._tensors[name], self._files[name] = tensor, path
        self.tensors = {name: TensorInfo(t.dtype, tuple(t.shape)) for name, t in self._tensors.items()}

    def where(self, name: str) -> Path:
        return self._files[name]

    def load(self, name: str) -> torch.Tensor:
        return self._tensors[name].contiguous()


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} of one pickle file, its data memory-mapped."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001  (unpickling refused, a truncated zip, the legacy format: all bad input)
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise ShardproofError(f"{path}: torch.load(weights_only=True, mmap=True) cannot read it ({reason})") from None
    if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        raise ShardproofError(f"{path}: not a flat state dict of named tensors")
    return loaded


@register_weight_loader("torch-pickle")
class PickleLoader(WeightLoader):
    """PyTorch pickle files, opened only inside `pickle_allowed()`."""

    expects = f"{BIN}, {BIN_INDEX} or *{PTH} (with --allow-pickle)"

    def claims(self, model_dir: Path) -> bool:
        return any(os.path.exists(model_dir / name) for name in (BIN, BIN_INDEX)) or any(model_dir.glob(f"*{PTH}"))

    def open(self, model_dir: Path) -> Weights:
        if not _ALLOWED.get():
            found = next(p.name for p in (model_dir / BIN_INDEX, model_dir / BIN, *sorted(model_dir.glob(f"*{PTH}")))
                         if os.path.exists(p))
            raise ShardproofError(f"{model_dir / found}: a PyTorch pickle checkpoint; reading it unpickles "
                                  "(torch.load with weights_only=True): pass --allow-pickle to read it")
        return PickleWeights(model_dir)


@register_checkpoint_loader("hf-torch")
class HFTorch(CheckpointLoader):
    """config.json with PyTorch pickle weights; verify builds the HF-side model from the tensors read here."""

    config_loader = "hf"
    weight_loader = "torch-pickle"
