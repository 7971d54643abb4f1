"""Fixtures shared across test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.fetch_smollm2 import cache_dir, is_complete


@pytest.fixture(scope="session")
def trained_model() -> Path:
    """The trained model bench/fetch_smollm2.py caches (SmolLM2-135M-Instruct, float32); skips when absent."""
    path = cache_dir()
    if not is_complete(path):
        pytest.skip(f"no trained model at {path}: run `python bench/fetch_smollm2.py` (pip install -e '.[trained]')")
    return path
