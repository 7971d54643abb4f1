"""A rank-file directory of any target as the reassembler and the verifiers see it: the plan its ranks must hold,
checked access to the rank files, and the HF config.json that reassembly writes back."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .card import get_card
from .checkpoint import TRTCheckpoint, _refuse_implausible_size
from .errors import ShardproofError
from .json_files import read_config
from .plan import Layout, build_plan, expected_source_shapes
from .rank_metadata import RankMetadata, read_rank_metadata
from .target import Target, get_target


class MetadataCheckpoint(TRTCheckpoint):
    """Rank files described by `rank{N}.json` (a target without TensorRT-LLM's config.json): the plan comes from
    the metadata (mapping, dtype) and the source's HF config, taken from the metadata or else from `model_dir`."""

    def __init__(self, directory: Path | str, target: Target, model_dir: Path | str | None = None):
        self.directory = Path(directory)
        self.target = target
        self.metadata: list[RankMetadata] = read_rank_metadata(self.directory, target.name)
        self.config = None
        first = self.metadata[0]
        self.hf_config_dict, parse, where = _hf_config(first, self.directory, model_dir)
        names = self.hf_config_dict.get("architectures")
        if not (isinstance(names, list) and len(names) == 1):
            raise ShardproofError(f"{self.directory}: the source config names no single architecture")
        self.card = get_card(names[0])
        target.rows(self.card)
        self.hf = self.card.config.view(self.hf_config_dict, parse, where)
        try:
            self.dims = self.card.config.dims_from_hf(self.hf)
        except ShardproofError as e:
            raise ShardproofError(f"{where}: {e}") from None
        self.layout = target.layout(Layout(dtype=first.dtype, mapping=first.mapping), self.dims, self.card)
        _refuse_implausible_size(self.card, self.dims, self.layout.mapping)
        self.source_shapes = expected_source_shapes(self.card, self.dims, self.layout, target)
        self.plan = build_plan(self.card, self.dims, self.layout, self.source_shapes, str(self.directory), target)
        self._readers = {}

    def hf_config(self) -> dict:
        return dict(self.hf_config_dict)


def _hf_config(meta: RankMetadata, directory: Path,
               model_dir: Path | str | None) -> tuple[dict, Callable[[], Any], Path]:
    """(config.json contents, its transformers parse, the file that holds it) of the source: the metadata's, else
    `model_dir`'s."""
    where = directory / "rank0.json"
    if meta.hf_config is not None:
        config = dict(meta.hf_config)

        def parse() -> Any:
            from transformers import AutoConfig

            try:
                return AutoConfig.for_model(**config)
            except Exception as e:  # transformers raises many types for a config it cannot build
                raise ShardproofError(f"{where}: transformers cannot parse its hf_config ({e})") from None

        return config, parse, where
    if model_dir is None:
        raise ShardproofError(f"{where}: holds no hf_config; pass the source model (--model_dir)")
    from .source import open_source

    source = open_source(model_dir)
    return source.config_dict, lambda: source.hf_config, source.config.files[0]


def open_checkpoint(directory: Path | str, target: str | Target | None = None,
                    model_dir: Path | str | None = None) -> TRTCheckpoint:
    """The rank files at `directory`, laid out in `target` (default: the TensorRT-LLM checkpoint)."""
    target = get_target(target)
    if target.trt_config:
        return TRTCheckpoint(directory)
    return MetadataCheckpoint(directory, target, model_dir)


def check_readable(directory: Path | str, target: str | Target | None = None,
                   model_dir: Path | str | None = None) -> None:
    """ShardproofError (one line naming the file) unless the directory's metadata can be read: config.json for a
    target that has one (its contents are judged later, by the checks), else every rank{N}.json and the plan they
    and the source's config give."""
    target = get_target(target)
    if target.trt_config:
        read_config(Path(directory), "checkpoint")
    else:
        MetadataCheckpoint(directory, target, model_dir)
