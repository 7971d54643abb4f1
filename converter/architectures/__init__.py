"""Built-in architectures, one module each; importing this package registers them."""

from . import gemma, llama, mistral, qwen2, qwen3  # noqa: F401
