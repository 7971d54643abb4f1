"""Deterministic source checkpoints: the same bytes on any machine, from a seed.

How determinism is achieved:
- values come from the raw 64-bit output of numpy's PCG64 (`Generator(PCG64(seed)).bit_generator.random_raw`),
  whose stream is fixed by the PCG64 algorithm and numpy's SeedSequence, not by a sampling method or a
  framework RNG that may change between versions;
- each raw word becomes a value with integer arithmetic and one exact scaling: the top 16 bits k give
  (k - 2**15) * 2**-18, a multiple of 2**-18 in [-0.125, 0.125) that float32 holds exactly (norms add the card's
  `norm_center`, still exact); no libm call, no rounding, so no platform or BLAS dependence;
- tensors are drawn in sorted name order and written as float32 numpy arrays with safetensors directly (the
  values never pass through torch); names and shapes are those transformers saves for the card's tiny config,
  and config.json is written by transformers' config class for the card (`card.tests.config_class`).
The converter's casts to float16/bfloat16 are IEEE round-to-nearest-even, so converted bytes are fixed too; the
manifests hold only converted output, which carries no transformers version or other machine metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from shardproof.converter.card import get_card
from shardproof.verify.tiny_models import saved_shapes, tiny_config

SCALE = 2.0**-18  # value spacing; 2**15 steps either side of zero give [-0.125, 0.125)


def draw(rng: np.random.Generator, shape: tuple[int, ...], center: float) -> np.ndarray:
    """`center` + a uniform multiple of 2**-18 in [-0.125, 0.125) per element, exactly, as float32."""
    count = int(np.prod(shape, dtype=np.int64))
    words = rng.bit_generator.random_raw(count)
    steps = (words >> np.uint64(48)).astype(np.int64) - 2**15
    return (steps.astype(np.float32) * np.float32(SCALE) + np.float32(center)).reshape(shape)


def write_source_model(directory: Path, architecture: str, seed: int, **overrides: Any) -> Path:
    """An HF checkpoint of the card's tiny config with `overrides`: config.json written by transformers, one
    model.safetensors with the tensor names and shapes transformers saves, every value drawn from `seed`
    (norms around the card's `norm_center`, so a mis-mapped norm shows)."""
    center = get_card(architecture).tests.norm_center
    rng = np.random.Generator(np.random.PCG64(seed))
    tensors = {
        name: draw(rng, shape, center if "norm" in name else 0.0)
        for name, shape in sorted(saved_shapes(architecture, **overrides).items())
    }
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_config(architecture, **overrides)
    config.dtype = "float32"
    config.save_pretrained(directory)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
