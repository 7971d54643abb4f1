"""Built-in architecture cards, one module each; importing this package registers them, in this order."""

from . import llama, mistral, qwen2, qwen3, gemma  # noqa: F401,I001
from . import gpt2  # noqa: F401
