"""Every rank of a checkpoint in this process, joined by ``SimulatedCollectives``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .blocks import rotary_cos_sin
from .collectives import SimulatedCollectives
from .rank_files import ShardedCheckpoint
from .stage import check_input_ids, run_stage


def run_simulated(checkpoint_dir: str | Path | ShardedCheckpoint, input_ids: Tensor,
                  device: torch.device | str = "cpu", compute_dtype: torch.dtype | None = None,
                  return_hidden: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Run every rank of the checkpoint in this process; return float32 logits [B, T, vocab_size].

    ``compute_dtype`` defaults to the checkpoint dtype. With ``return_hidden`` also return the
    residual stream [B, T, H] (float32) after each of the ``num_hidden_layers`` global layers
    (before ln_f), as seen by TP rank 0 of the stage holding the layer.
    """
    ckpt = (checkpoint_dir if isinstance(checkpoint_dir, ShardedCheckpoint)
            else ShardedCheckpoint(checkpoint_dir))
    cfg = ckpt.config
    ckpt.validate()
    ids = check_input_ids(input_ids, cfg).to(device)
    rope = rotary_cos_sin(cfg, ids.shape[1], device)
    comm, hidden = SimulatedCollectives(), ([] if return_hidden else None)
    xs: Tensor | list[Tensor] = ids
    for pp_rank in range(cfg.pp_size):  # TP rank t of stage p hands its hidden states to TP rank t of p+1
        ws = [ckpt.weights(pp_rank * cfg.tp_size + t, device, compute_dtype) for t in range(cfg.tp_size)]
        xs = run_stage(ckpt.family, cfg, pp_rank, ws, xs, comm, rope, hidden)
    return (xs[0], hidden) if return_hidden else xs[0]
