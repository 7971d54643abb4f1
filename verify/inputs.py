"""Reading the inputs of a verification up front: an input that cannot be read is bad input, never a failed check."""

from __future__ import annotations

from pathlib import Path

from shardproof.converter.card import get_card
from shardproof.converter.source import open_source
from shardproof.converter.target_checkpoint import check_readable

from .forward import BatchOptions


def check_model(model_dir: Path | str, batch: BatchOptions) -> None:
    """ShardproofError unless `model_dir` is a readable, supported HF model whose positions cover `batch`."""
    source = open_source(model_dir)
    get_card(source.architecture)
    batch.fit(getattr(source.hf_config, "max_position_embeddings", None), str(model_dir))


def check_inputs(model_dir: Path | str, checkpoint_dir: Path | str, batch: BatchOptions,
                 target: str | None = None) -> None:
    """ShardproofError (one line naming the path and the problem) for a model or checkpoint that cannot be read;
    `target` names the checkpoint's layout (default: the TensorRT-LLM checkpoint)."""
    check_model(model_dir, batch)
    check_readable(checkpoint_dir, target, model_dir)
