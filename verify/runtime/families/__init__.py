"""One module per family forward; importing this package registers them."""

from . import gemma, gpt2, llama, mixtral, phi3, qwen2  # noqa: F401
