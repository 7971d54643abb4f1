"""Tiny random HF models built from a card's config, every parameter randomized (norms too), for demos and tests."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from shardproof.converter.card import TestSupport, get_card

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def tiny_sizes(architecture: str, **overrides: Any) -> dict[str, Any]:
    """The tiny model's sizes under the shared names (`hidden_size`, `num_key_value_heads`, ...): the shared tiny
    sizes, then the card's, then `overrides`."""
    fields = {**TINY, **get_card(architecture).tests.tiny, **overrides}
    fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    return fields


def tiny_config(architecture: str, **overrides: Any):
    """A transformers config for a tiny model of `architecture` (`tiny_sizes`, spelled as its config class does)."""
    import transformers

    card = get_card(architecture)
    fields = tiny_sizes(architecture, **overrides)
    config = getattr(transformers, card.tests.config_class)(**card.tests.config_fields(fields))
    config.architectures = [architecture]
    return config


def randomize_(model: torch.nn.Module, seed: int, tests: TestSupport) -> None:
    """Give every parameter random values: weights and biases N(0, 0.1), norm weights (`tests.is_norm`)
    `tests.norm_center` + N(0, 0.1).

    HF initializes norms to ones and biases to zeros, which would hide a mis-mapped norm or bias.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * 0.1
            value = tests.norm_center + noise if tests.is_norm(name) else noise
            param.copy_(value.to(param.dtype))


def build_tiny_model(
    directory: Path | str,
    architecture: str,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    **overrides: Any,
) -> Path:
    """Save a randomized tiny `architecture` model to `directory` (safetensors, sharded if `max_shard_size`)."""
    from transformers import AutoModelForCausalLM

    card = get_card(architecture)
    config = tiny_config(architecture, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    randomize_(model, seed, card.tests)
    model = model.to(getattr(torch, dtype))
    directory = Path(directory)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    saved = json.loads((directory / "config.json").read_text())
    if saved["architectures"] != [architecture]:  # transformers writes its class name; a card may be a variant
        (directory / "config.json").write_text(json.dumps({**saved, "architectures": [architecture]}, indent=2))
    if card.renames:
        rename_saved(directory, card.checkpoint_name)
    return directory


def rename_saved(directory: Path, rename: Callable[[str], str]) -> None:
    """Rename every tensor of a saved checkpoint (its safetensors files and index) with `rename`."""
    for path in sorted(directory.glob("*.safetensors")):
        tensors = load_file(path)
        save_file({rename(name): tensor for name, tensor in tensors.items()}, path, metadata={"format": "pt"})
    index = directory / "model.safetensors.index.json"
    if index.exists():
        content = json.loads(index.read_text())
        content["weight_map"] = {rename(name): file for name, file in content["weight_map"].items()}
        index.write_text(json.dumps(content, indent=2))


def saved_tensor_shapes(model: torch.nn.Module, rename: Callable[[str], str] = str) -> dict[str, tuple[int, ...]]:
    """Every tensor name (passed through `rename`) and shape in the files transformers writes for `model` (tied
    copies and non-persistent buffers left out exactly as transformers leaves them out)."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        shapes = {}
        for path in sorted(Path(tmp).glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                shapes.update({rename(name): tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    return shapes


def saved_shapes(architecture: str, **overrides: Any) -> dict[str, tuple[int, ...]]:
    """`saved_tensor_shapes` of a causal LM of the tiny config of a registered `architecture`, under the card's
    checkpoint names."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config(architecture, **overrides))
    return saved_tensor_shapes(model, get_card(architecture).checkpoint_name)
