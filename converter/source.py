"""The source checkpoint, opened through the first registered checkpoint format that claims its directory."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from .dtypes import TORCH_DTYPES
from .errors import ShardproofError
from .loaders import CHECKPOINT_LOADERS, WEIGHT_LOADERS, CheckpointLoader, SourceConfig, TensorInfo, Weights
from .safetensors_io import Shape


class Source:
    """A model directory read by one checkpoint format: its config (`SourceConfig`) and lazy tensors (`Weights`).

    Every tensor must be float32, float16 or bfloat16; `load` checks that each tensor read has the dtype and
    shape its metadata declared (a weight loader that breaks its contract is bad input, never a wrong
    conversion). `loader` is the checkpoint loader that opened the directory (None for a model built otherwise,
    such as the one reassembly gives back)."""

    def __init__(self, model_dir: Path, format_name: str, loader: CheckpointLoader | None, config: SourceConfig,
                 weights: Weights):
        self.model_dir, self.format_name, self.loader = model_dir, format_name, loader
        self.config, self.weights = config, weights
        for name, info in weights.tensors.items():
            if info.dtype not in TORCH_DTYPES.values():
                raise ShardproofError(f"{weights.where(name)}: tensor {name} has dtype {str(info.dtype).replace('torch.', '')}; "
                                      "only float32, float16 and bfloat16 are converted")

    @property
    def config_dict(self) -> dict:
        return dict(self.config.fields)

    @property
    def hf_config(self):
        return self.config.hf_config

    @property
    def architecture(self) -> str:
        return self.config.architecture

    @property
    def files(self) -> list[Path]:
        """Every file the conversion reads: the config's, then the weights'."""
        return list(dict.fromkeys([*self.config.files, *self.weights.files]))

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return dict(self.weights.tensors)

    @property
    def source_dtype(self) -> str | None:
        """The checkpoint's declared dtype (config `dtype` or `torch_dtype`), else the dtype of most of its tensors."""
        declared = self.config.fields.get("dtype") or self.config.fields.get("torch_dtype")
        if declared:
            return str(declared).replace("torch.", "")
        dtypes = [info.dtype for info in self.weights.tensors.values()]
        return str(max(set(dtypes), key=dtypes.count)).replace("torch.", "") if dtypes else None

    @property
    def shapes(self) -> dict[str, Shape]:
        return {name: info.shape for name, info in self.weights.tensors.items()}

    def dtype(self, name: str) -> torch.dtype:
        """Tensor `name`'s stored dtype, from its metadata."""
        return self.weights.tensors[name].dtype

    def nbytes(self, name: str) -> int:
        """The size of tensor `name`'s data, from its metadata."""
        return self.weights.tensors[name].nbytes

    def record_digests(self) -> dict[Path, dict[str, bytes]]:
        """From now on, the digest of every tensor read (`digests.part_digest`), by file and name, where the weight
        loader can take them (`Weights.record_digests`): a conversion's `source_fingerprint` reuses them instead of
        reading the tensors again; verification, which reads the source several times, takes none."""
        return self.weights.record_digests()

    def load(self, name: str, device: torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `name` on `device` (None: the CPU, as the weight loader reads it), cast to `dtype` (None: its
        stored dtype) as it is read."""
        info = self.weights.tensors[name]
        if device is None and dtype is None:
            tensor = self.weights.load(name)
        else:
            tensor = self.weights.load_to(name, device or torch.device("cpu"), dtype)
        if tensor.dtype != (dtype or info.dtype) or tuple(tensor.shape) != info.shape:
            raise ShardproofError(f"{self.weights.where(name)}: tensor {name} reads as {tensor.dtype} {list(tensor.shape)}, "
                                  f"its metadata says {info.dtype} {list(info.shape)}")
        return tensor

    def blocks(self, name: str, block_bytes: int) -> Iterator[torch.Tensor]:
        """Tensor `name`'s bytes as stored (uint8), `block_bytes` at a time (the last block shorter), each valid until
        the next is asked for: read a block at a time where the weight loader can (`Weights.blocks`), else `load`ed
        whole and cut."""
        blocks = self.weights.blocks(name, block_bytes)
        if blocks is None:
            data = self.load(name).contiguous().view(-1).view(torch.uint8)
            blocks = (data[start : start + block_bytes] for start in range(0, data.numel(), block_bytes))
        return blocks


def open_source(model_dir: Path | str) -> Source:
    """`model_dir` opened by the first registered checkpoint format that claims it; ShardproofError naming what each
    format looks for when none does."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ShardproofError(f"{model_dir}: model directory not found")
    for entry in CHECKPOINT_LOADERS.entries():
        if entry.item.claims(model_dir):
            config, weights = entry.item.open(model_dir)
            return Source(model_dir, entry.name, entry.item, config, weights)
    looked_for = "; ".join(f"{e.name}: {WEIGHT_LOADERS.get(e.item.weight_loader).expects}"
                           for e in CHECKPOINT_LOADERS.entries())
    raise ShardproofError(f"{model_dir}: holds no checkpoint in a registered format ({looked_for})")
