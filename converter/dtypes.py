"""dtype names as TensorRT-LLM spells them, torch dtypes, and safetensors header codes."""

from __future__ import annotations

import torch

from .errors import ShardproofError

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# safetensors header code for every dtype we may read or write.
_CODES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FROM_CODE = {code: dtype for dtype, code in _CODES.items()}
FLOAT_CODES = ("F32", "F16", "BF16")


def safetensors_code(dtype: torch.dtype) -> str:
    """The safetensors header code ("F16", ...) of a torch dtype."""
    return _CODES[dtype]


def from_safetensors_code(code: str) -> torch.dtype:
    """The torch dtype of a safetensors header code."""
    if code not in _FROM_CODE:
        raise ShardproofError(f"unsupported safetensors dtype {code!r}")
    return _FROM_CODE[code]


def dtype_name(dtype: torch.dtype) -> str:
    """TensorRT-LLM's name ("float16", ...) of a floating torch dtype."""
    for name, candidate in TORCH_DTYPES.items():
        if candidate == dtype:
            return name
    raise ShardproofError(f"unsupported dtype {dtype}")


def resolve_dtype(requested: str, source_dtype: str | None) -> str:
    """The checkpoint dtype for --dtype: `auto` takes the source's, with float32 becoming float16 as TensorRT-LLM does."""
    if requested == "auto":
        name = str(source_dtype or "float16").replace("torch.", "")
        if name not in TORCH_DTYPES:
            raise ShardproofError(f"--dtype auto: the source dtype {name!r} is not one of {', '.join(TORCH_DTYPES)}")
        return "float16" if name == "float32" else name
    if requested not in TORCH_DTYPES:
        raise ShardproofError(f"--dtype {requested!r} is not one of auto, {', '.join(TORCH_DTYPES)}")
    return requested
