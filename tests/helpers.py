"""Fast random HF checkpoints for property tests: names and shapes as transformers saves them, values from a seed."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from shardproof.converter.card import get_card
from shardproof.verify.tiny_models import saved_shapes, tiny_config


def random_checkpoint(directory: Path, architecture: str, seed: int, dtype: str = "float32", shards: int = 1, **overrides) -> Path:
    """An HF checkpoint with the tensor names and shapes transformers saves for the config, every value random
    (norms around the card's norm center, so a mis-mapped norm shows); `shards` > 1 writes a sharded checkpoint
    with model.safetensors.index.json."""
    config = tiny_config(architecture, **overrides)
    tests = get_card(architecture).tests
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in saved_shapes(architecture, **overrides).items():
        value = torch.randn(shape, generator=generator) * 0.1
        tensors[name] = (tests.norm_center + value if tests.is_norm(name) else value).to(getattr(torch, dtype))
    directory.mkdir(parents=True, exist_ok=True)
    config.dtype = dtype
    config.save_pretrained(directory)
    if shards == 1:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return directory
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = keys[i::shards]
        filename = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, directory / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, filename))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def load_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF checkpoint directory (single file or sharded)."""
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def restamp_manifest(checkpoint_dir: Path) -> None:
    """Rewrite the checkpoint's integrity manifest over its files as they are now: what a converter that wrote
    these (faulty) files would have written, so the checks behind the manifest see the fault."""
    from shardproof.converter.digests import file_digest
    from shardproof.converter.manifest import MANIFEST, Manifest

    manifest = Manifest.read(checkpoint_dir / MANIFEST)
    files = {name: file_digest(checkpoint_dir / name) for name in manifest.files}
    Manifest(manifest.tool_version, manifest.source, files).write(checkpoint_dir)
