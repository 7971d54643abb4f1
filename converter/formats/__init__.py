"""The built-in checkpoint formats; importing this package registers their loaders (first registered, first tried:
safetensors before pickle)."""

from . import hf, torch_pickle  # noqa: F401
