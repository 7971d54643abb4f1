"""One pipeline stage over the TP ranks it is given, and the input check both runners share."""

from __future__ import annotations

from torch import Tensor

from .blocks import Rope
from .collectives import Collectives
from .config import RuntimeConfig
from .family import Family
from .rank_files import LAYER_PREFIX, RankWeights


def run_stage(family: Family, cfg: RuntimeConfig, pp_rank: int, ws: list[RankWeights],
              inputs: Tensor | list[Tensor], comm: Collectives, rope: Rope,
              hidden: list[Tensor] | None = None) -> list[Tensor]:
    """One pipeline stage for the TP ranks ``ws``: token ids (first stage) or per-rank hidden
    states in; per-rank hidden states (or float32 logits on the last stage) out. Appends a
    float32 copy of TP rank ws[0]'s residual stream after each layer to ``hidden`` if given."""
    xs = family.embed(inputs, ws, cfg, comm) if pp_rank == 0 else list(inputs)
    for j in range(len(cfg.stage_layers(pp_rank))):
        xs = family.layer(xs, [w.scope(LAYER_PREFIX.format(j)) for w in ws], cfg, rope, comm)
        if hidden is not None:
            hidden.append(xs[0].float())
    return family.logits(xs, ws, cfg, comm) if pp_rank == cfg.pp_size - 1 else xs


def check_input_ids(input_ids: Tensor, cfg: RuntimeConfig) -> Tensor:
    """Reject anything but a non-empty [B, T] integer tensor of ids in [0, vocab_size)."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError("input_ids must be an integer tensor of shape [batch, seq_len]")
    if input_ids.numel() == 0:
        raise ValueError("input_ids is empty")
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size:
        raise ValueError(f"input_ids outside [0, {cfg.vocab_size})")
    return input_ids.long()
