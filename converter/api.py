"""Converter entry points: plan a conversion from headers, then run it."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

from .atomic import atomic_directory
from .card import Card, get_card
from .dtypes import resolve_dtype
from .errors import ShardproofError
from .bounded_pool import default_workers
from .execute import Progress, write_checkpoint
from .manifest import source_fingerprint, write_manifest
from .mapping import Mapping
from .plan import Layout, Plan, build_plan
from .rank_metadata import RankMetadata
from .source import Source, open_source
from .target import Target, get_target
from .trt_config import trt_config
from .value_range import ValueGuard

log = logging.getLogger("shardproof")


def plan_conversion(
    model_dir: Path | str,
    dtype: str = "auto",
    tp_size: int = 1,
    pp_size: int = 1,
    use_parallel_embedding: bool = False,
    embedding_sharding_dim: int = 0,
    moe_tp_size: int | None = None,
    moe_ep_size: int | None = None,
    target: str | Target | None = None,
) -> tuple[Plan, Source]:
    """Open `model_dir` in its checkpoint format, read its config and tensor metadata (no tensor data) and plan
    the conversion into `target`'s layout (converter/target.py; default: the TensorRT-LLM checkpoint).

    `moe_tp_size` / `moe_ep_size` split the experts of a MoE model over the TP ranks (product tp_size; left
    out: all tensor-parallel, as TensorRT-LLM defaults)."""
    target = get_target(target)
    source = open_source(model_dir)
    card = get_card(source.architecture)
    target.rows(card)  # refuses a card the target does not support, before anything else
    config_path = source.config.files[0]
    hf = hf_view(card, source)
    try:
        ignored = card.config.ignored(source.config_dict)
        dims = card.config.dims_from_hf(hf)
    except ShardproofError as e:
        raise ShardproofError(f"{config_path}: {e}") from None
    layout = target.layout(
        Layout(
            dtype=resolve_dtype(dtype, source.source_dtype),
            mapping=Mapping(tp_size=tp_size, pp_size=pp_size, moe_tp_size=moe_tp_size, moe_ep_size=moe_ep_size),
            use_parallel_embedding=use_parallel_embedding,
            embedding_sharding_dim=embedding_sharding_dim,
        ),
        dims,
        card,
    )
    plan = build_plan(card, dims, layout, source.shapes, where=str(source.model_dir), target=target)
    return dataclasses.replace(plan, ignored_fields=ignored), source


def hf_view(card: Card, source: Source) -> Any:
    """The source's HF config as `card`'s translation reads it (`ConfigMap.view`)."""
    return card.config.view(source.config_dict, lambda: source.hf_config, source.config.files[0])


def convert(
    model_dir: Path | str,
    output_dir: Path | str,
    dtype: str = "auto",
    tp_size: int = 1,
    pp_size: int = 1,
    use_parallel_embedding: bool = False,
    embedding_sharding_dim: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
    moe_tp_size: int | None = None,
    moe_ep_size: int | None = None,
    workers: int | None = None,
    allow_nonfinite: bool = False,
    clamp: bool = False,
    note: Callable[[str], None] | None = None,
    target: str | Target | None = None,
) -> Plan:
    """Convert an HF checkpoint into a TensorRT-LLM checkpoint at `output_dir`, which appears only when complete,
    with its integrity manifest (converter/manifest.py).

    `workers` threads read, cast, shard and write at once (default: one per usable core); the output's bytes do
    not depend on it. A NaN or Inf in a source tensor, or a value the cast to `dtype` overflows, is refused
    (ShardproofError, no output) unless `allow_nonfinite` (converted as it is) or, for overflow, `clamp`
    (saturated to the dtype's finite max); what either flag did is passed to `note` (default: the `shardproof`
    logger's warning), one line each. `target` picks the layout (converter/target.py): a target without
    TensorRT-LLM's config.json gets one `rank{N}.json` per rank instead (converter/rank_metadata.py)."""
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ShardproofError(f"--workers {workers}: must be at least 1")
    target = get_target(target)
    plan, source = plan_conversion(model_dir, dtype, tp_size, pp_size, use_parallel_embedding, embedding_sharding_dim,
                                   moe_tp_size, moe_ep_size, target)
    guard = ValueGuard(str(source.model_dir), allow_nonfinite, clamp)
    with atomic_directory(Path(output_dir), overwrite, inputs=[Path(model_dir)]) as staging:
        config = trt_config(plan, hf_view(plan.card, source)) if target.trt_config else None
        read = source.record_digests()
        written = write_checkpoint(plan, source, staging, config, progress, workers, guard)
        fingerprint = source_fingerprint(source, read, workers)
        if not target.trt_config:
            mapping = plan.layout.mapping
            for rank in plan.ranks:
                RankMetadata(target.name, plan.layout.dtype, mapping.tp_size, mapping.pp_size, rank.rank, rank.tp_rank,
                             rank.pp_rank, fingerprint, source.config_dict, mapping.moe_tp_size,
                             mapping.moe_ep_size).write(staging)
        write_manifest(staging, fingerprint, written)
    for line in guard.notes():
        (note or log.warning)(line)
    return plan
