"""The HuggingFace checkpoint: config.json parsed by transformers, tensors in safetensors files (one, or the shards
an index names), read from headers first and data on demand."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from ..dtypes import FLOAT_CODES, from_safetensors_code
from ..errors import ShardproofError
from ..json_files import read_config
from ..loaders import (CheckpointLoader, ConfigLoader, SourceConfig, TensorInfo, WeightLoader, Weights,
                       register_checkpoint_loader, register_config_loader, register_weight_loader)
from ..safetensors_index import INDEX, SINGLE, weight_files
from ..safetensors_io import TensorReader, read_header


@register_config_loader("hf")
class HFConfigLoader(ConfigLoader):
    """`config.json`'s fields; transformers' AutoConfig parses it (its own validation included) when asked."""

    def load(self, model_dir: Path) -> SourceConfig:
        path, fields = read_config(model_dir, "model")
        return SourceConfig(fields, (path,), lambda: auto_config(model_dir, path))


class SafetensorsWeights(Weights):
    def __init__(self, model_dir: Path):
        index = model_dir / INDEX
        self._files: dict[str, Path] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.files = tuple(([index] if index.exists() else []) + weight_files(model_dir))
        for path in self.files:
            if path == index:
                continue
            for name, (code, shape) in read_header(path).items():
                if name in self.tensors:
                    raise ShardproofError(f"{path}: tensor {name} also appears in {self._files[name].name}")
                if code not in FLOAT_CODES:
                    raise ShardproofError(f"{path}: tensor {name} has dtype {code}; only F32, F16 and BF16 are converted")
                self._files[name] = path
                self.tensors[name] = TensorInfo(from_safetensors_code(code), shape)
        self._readers = {path: TensorReader(path) for path in dict.fromkeys(self._files.values())}

    def where(self, name: str) -> Path:
        return self._files[name]

    def load(self, name: str) -> torch.Tensor:
        return self._readers[self._files[name]].read(name)

    def load_to(self, name: str, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._readers[self._files[name]].read_to(name, device, dtype)

    def blocks(self, name: str, block_bytes: int) -> Iterator[torch.Tensor]:
        return self._readers[self._files[name]].blocks(name, block_bytes)

    def record_digests(self) -> dict[Path, dict[str, bytes]]:
        for reader in self._readers.values():
            reader.digests = {} if reader.digests is None else reader.digests
        return {path: reader.digests for path, reader in self._readers.items()}


@register_weight_loader("safetensors")
class SafetensorsLoader(WeightLoader):
    """`model.safetensors`, or the shards `model.safetensors.index.json` names, all inside the directory."""

    expects = f"{SINGLE} or {INDEX}"

    def claims(self, model_dir: Path) -> bool:
        return (model_dir / SINGLE).exists() or (model_dir / INDEX).exists()

    def open(self, model_dir: Path) -> Weights:
        return SafetensorsWeights(model_dir)


@register_checkpoint_loader("hf-safetensors")
class HFSafetensors(CheckpointLoader):
    """HF's own layout: config.json and safetensors, which transformers loads from the directory itself."""

    config_loader = "hf"
    weight_loader = "safetensors"
    transformers_reads_directory = True


def auto_config(model_dir: Path, config_path: Path):
    """transformers' config of `model_dir`; anything transformers refuses is bad input naming `config_path`."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # transformers' own validation of a hostile config raises many types (huggingface_hub's
        # StrictDataclassError, ValueError, TypeError, ZeroDivisionError for zero heads, ...): all are bad input
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = " ".join(lines)[:300] if lines else type(e).__name__
        if isinstance(e, ArithmeticError):
            reason = f"{type(e).__name__}: {reason}; is a size or head count zero?"
        raise ShardproofError(f"{config_path}: transformers cannot parse it ({reason})") from None
