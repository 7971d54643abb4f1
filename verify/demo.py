"""`shardproof check --demo`: a tiny random model and a layout that exercises KV-head replication and vocab padding."""

from __future__ import annotations

from pathlib import Path

from shardproof.converter.card import cards
from shardproof.converter.transforms import ceil_div

from .tiny_models import build_tiny_model

# GQA with 2 KV heads over tp=4: every KV head is stored on 2 ranks; vocab 1001 pads lm_head to 1004 rows.
MODEL = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
    vocab_size=1001, max_position_embeddings=1024,
)
LAYOUT = dict(dtype="float16", tp_size=4, pp_size=2)


def default_architecture() -> str:
    """The demo's architecture unless one is asked for: the first registered card."""
    return cards()[0].name


def build_demo_model(directory: Path, architecture: str, seed: int = 0) -> Path:
    """Save the demo model of `architecture` (every parameter random) to `directory`."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    return build_tiny_model(directory, architecture, seed=seed, **MODEL)


def describe(directory: Path, architecture: str, dtype: str, tp_size: int, pp_size: int) -> str:
    """What the demo built and what the chosen layout exercises."""
    m = MODEL
    text = (
        f"demo: built a random {architecture} ({m['num_hidden_layers']} layers, hidden {m['hidden_size']}, "
        f"{m['num_attention_heads']} heads, {m['num_key_value_heads']} KV heads, vocab {m['vocab_size']}) in {directory}; "
        f"checking it as {dtype} with tp={tp_size} pp={pp_size}"
    )
    notes = []
    if tp_size > m["num_key_value_heads"]:
        notes.append(f"each KV head is replicated on {tp_size // m['num_key_value_heads']} ranks")
    padded = ceil_div(m["vocab_size"], tp_size) * tp_size
    if padded != m["vocab_size"]:
        notes.append(f"lm_head is padded from {m['vocab_size']} to {padded} rows")
    return text + (": " + ", ".join(notes) if notes else "")
