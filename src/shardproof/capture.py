"""Capture a live engine's per-rank weights: `dump_rank(model, out_dir, mapping, source)`.

Called in each rank's process after TensorRT-LLM's PyTorch backend has loaded the HF checkpoint; it imports
nothing of TensorRT-LLM. It writes that rank's `named_parameters()` to `rank{N}.safetensors` and `rank{N}.json`
(converter/rank_metadata.py: the mapping, the dtype, the source's fingerprint and, given the model directory, its
config.json), which `shardproof verify --target trtllm-pytorch --checkpoint_dir DUMP --model_dir HF` checks like
a converted checkpoint. docs/pytorch-backend.md shows the three lines to add to a load path.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from shardproof.converter.dtypes import dtype_name
from shardproof.converter.errors import ShardproofError
from shardproof.converter.json_files import read_json
from shardproof.converter.manifest import FileDigest, source_fingerprint
from shardproof.converter.source import open_source
from shardproof.converter.rank_metadata import RankMetadata

TARGET = "trtllm-pytorch"


def _coords(mapping: Any) -> tuple[int, int, int, int, int]:
    """(tp_size, pp_size, rank, tp_rank, pp_rank) of a TensorRT-LLM `Mapping` (or anything with those attributes;
    tp_rank / pp_rank derived from rank when absent, rank = pp_rank * tp_size + tp_rank)."""
    try:
        tp, pp, rank = int(mapping.tp_size), int(mapping.pp_size), int(mapping.rank)
    except AttributeError as e:
        raise ShardproofError(f"mapping has no {e.name or 'tp_size, pp_size or rank'} attribute") from None
    tp_rank = int(getattr(mapping, "tp_rank", rank % tp))
    pp_rank = int(getattr(mapping, "pp_rank", rank // tp))
    return tp, pp, pp_rank * tp + tp_rank, tp_rank, pp_rank


def dump_rank(model: torch.nn.Module, out_dir: Path | str, mapping: Any,
              source: Path | str | Mapping[str, FileDigest]) -> Path:
    """Write `model`'s parameters as this rank holds them to `out_dir/rank{N}.safetensors` with `rank{N}.json`.

    `mapping` is TensorRT-LLM's `Mapping` of this rank (duck-typed: tp_size, pp_size, rank, tp_rank, pp_rank, and
    moe_tp_size / moe_ep_size when it splits experts);
    `source` the HF model directory the engine loaded (fingerprinted here, its config.json recorded) or that
    directory's fingerprint (`converter.manifest.source_fingerprint`). Parameters shared by two modules (a tied
    lm_head) are written once, under the first name, as `named_parameters()` gives them. Returns the rank file.
    """
    tp, pp, rank, tp_rank, pp_rank = _coords(mapping)
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters()}
    if not tensors:
        raise ShardproofError("the model has no parameters to dump")
    floating = Counter(dtype_name(t.dtype) for t in tensors.values() if t.is_floating_point())
    dtype = floating.most_common(1)[0][0] if floating else "float32"
    if isinstance(source, (str, os.PathLike)):
        model_dir = Path(source)
        fingerprint, hf_config = source_fingerprint(open_source(model_dir)), read_json(model_dir / "config.json")
    else:
        fingerprint, hf_config = dict(source), None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"rank{rank}.safetensors"
    partial = out / f".rank{rank}.safetensors.partial"
    save_file(tensors, partial, metadata={"format": "pt"})
    os.replace(partial, path)
    moe = [getattr(mapping, name, None) for name in ("moe_tp_size", "moe_ep_size")]
    moe_tp, moe_ep = (int(v) if isinstance(v, int) and v > 0 else None for v in moe)  # TensorRT-LLM's -1: default
    RankMetadata(TARGET, dtype, tp, pp, rank, tp_rank, pp_rank, fingerprint, hf_config, moe_tp, moe_ep).write(out)
    return path
