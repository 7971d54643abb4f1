"""Built-in architecture cards, one module each; importing this package registers them, in this order."""

from . import llama, mistral, qwen2, qwen3, gemma, phi3, mixtral, gpt2  # noqa: F401,I001
