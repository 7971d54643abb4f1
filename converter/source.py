"""The HuggingFace checkpoint: config.json parsed by transformers, tensor headers, lazily loaded data."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .dtypes import FLOAT_CODES, from_safetensors_code
from .errors import ShardproofError
from .json_files import read_config
from .safetensors_index import weight_files
from .safetensors_io import Shape, TensorReader, read_header


class HFCheckpoint:
    """An HF model directory: `config.json` plus `model.safetensors` or shards named by the index."""

    def __init__(self, model_dir: Path | str):
        self.model_dir = Path(model_dir)
        config_path, self.config_dict = read_config(self.model_dir, "model")
        self.hf_config = _auto_config(self.model_dir, config_path)
        self._files: dict[str, Path] = {}
        self.headers: dict[str, tuple[str, Shape]] = {}
        for path in weight_files(self.model_dir):
            for name, (code, shape) in read_header(path).items():
                if name in self.headers:
                    raise ShardproofError(f"{path}: tensor {name} also appears in {self._files[name].name}")
                if code not in FLOAT_CODES:
                    raise ShardproofError(f"{path}: tensor {name} has dtype {code}; only F32, F16 and BF16 are converted")
                self._files[name] = path
                self.headers[name] = (code, shape)
        self._readers: dict[Path, TensorReader] = {}

    @property
    def architecture(self) -> str:
        names = self.config_dict.get("architectures")
        if not (isinstance(names, list) and len(names) == 1 and isinstance(names[0], str)):
            raise ShardproofError(f"{self.model_dir / 'config.json'}: 'architectures' must be a list naming exactly one architecture")
        return names[0]

    @property
    def source_dtype(self) -> str | None:
        """The checkpoint's declared dtype (config `dtype` or `torch_dtype`), else the dtype of most of its tensors."""
        declared = self.config_dict.get("dtype") or self.config_dict.get("torch_dtype")
        if declared:
            return str(declared).replace("torch.", "")
        codes = [code for code, _ in self.headers.values()]
        by_code = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
        return by_code[max(set(codes), key=codes.count)] if codes else None

    @property
    def shapes(self) -> dict[str, Shape]:
        return {name: shape for name, (_, shape) in self.headers.items()}

    def nbytes(self, name: str) -> int:
        """The size of tensor `name`'s data, from its header."""
        code, shape = self.headers[name]
        return math.prod(shape) * from_safetensors_code(code).itemsize

    def read_digests(self) -> dict[Path, dict[str, bytes]]:
        """The SHA-256 of every tensor read so far, by file and name (`source_fingerprint` reuses them)."""
        return {path: reader.digests for path, reader in self._readers.items()}

    def load(self, name: str) -> torch.Tensor:
        """The tensor `name`, in its stored dtype."""
        path = self._files[name]
        if path not in self._readers:
            self._readers[path] = TensorReader(path)
        return self._readers[path].read(name)


def _auto_config(model_dir: Path, config_path: Path):
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
