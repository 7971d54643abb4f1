"""The `npy` checkpoint format: config.json (HF's), one `.npy` file per tensor, and `weights.json` naming each
tensor's file, dtype and shape. bfloat16, which numpy has no type for, is stored as its uint16 bit patterns.

Only the weight loader is new: the format reuses shardproof's `hf` config loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from shardproof.converter.errors import ShardproofError
from shardproof.converter.loaders import (CheckpointLoader, TensorInfo, WeightLoader, Weights,
                                          register_checkpoint_loader, register_weight_loader)

INDEX = "weights.json"
DTYPES = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16),
          "bfloat16": (torch.bfloat16, np.uint16)}


class NpyWeights(Weights):
    def __init__(self, model_dir: Path):
        index = model_dir / INDEX
        try:
            entries = json.loads(index.read_text())["tensors"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ShardproofError(f"{index}: not a weight index with a 'tensors' object ({type(e).__name__})") from None
        self._files: dict[str, Path] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in entries.items():
            try:
                file, dtype, shape = entry["file"], entry["dtype"], tuple(int(n) for n in entry["shape"])
            except (KeyError, TypeError, ValueError):
                raise ShardproofError(f"{index}: tensor {name}: needs 'file', 'dtype' and 'shape'") from None
            path = model_dir / file
            if Path(file).name != file or not path.is_file():
                raise ShardproofError(f"{index}: tensor {name}: {file!r} is not a file of {model_dir}")
            if dtype not in DTYPES:
                raise ShardproofError(f"{index}: tensor {name}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
            self._files[name], self.tensors[name] = path, TensorInfo(DTYPES[dtype][0], shape)
        self.files = (index, *dict.fromkeys(self._files.values()))

    def where(self, name: str) -> Path:
        return self._files[name]

    def load(self, name: str) -> torch.Tensor:
        path, info = self._files[name], self.tensors[name]
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ShardproofError(f"{path}: not a .npy array ({e})") from None
        stored = next(np_type for torch_type, np_type in DTYPES.values() if torch_type == info.dtype)
        if array.dtype != stored:
            raise ShardproofError(f"{path}: holds {array.dtype}, the index says {info.dtype} (stored as {np.dtype(stored)})")
        tensor = torch.from_numpy(np.array(array))  # a copy: the map is read-only
        return tensor.view(torch.bfloat16) if info.dtype == torch.bfloat16 else tensor


@register_weight_loader("npy")
class NpyLoader(WeightLoader):
    """One `.npy` per tensor, named by `weights.json`."""

    expects = f"{INDEX} and one .npy file per tensor"

    def claims(self, model_dir: Path) -> bool:
        return (model_dir / INDEX).is_file()

    def open(self, model_dir: Path) -> Weights:
        return NpyWeights(model_dir)


@register_checkpoint_loader("hf-npy")
class HFNpy(CheckpointLoader):
    """HF's config.json with `npy` weights."""

    config_loader = "hf"
    weight_loader = "npy"


def save_npy_checkpoint(tensors: dict[str, torch.Tensor], config_json: Path, directory: Path) -> Path:
    """Write `tensors` and a copy of `config_json` as an `npy` checkpoint in `directory` (tests and examples)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(config_json.read_text())
    index = {}
    for i, (name, tensor) in enumerate(sorted(tensors.items())):
        dtype = str(tensor.dtype).replace("torch.", "")
        data = tensor.view(torch.uint16) if tensor.dtype == torch.bfloat16 else tensor
        file = f"{i:05d}.npy"
        np.save(directory / file, data.contiguous().numpy())
        index[name] = {"file": file, "dtype": dtype, "shape": list(tensor.shape)}
    (directory / INDEX).write_text(json.dumps({"tensors": index}, indent=1))
    return directory
