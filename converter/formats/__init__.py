"""The built-in checkpoint formats; importing this package registers their loaders (first registered, first tried)."""

from . import hf  # noqa: F401
