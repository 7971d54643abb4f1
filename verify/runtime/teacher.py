"""The checkpoint's stages run one at a time on inputs given from outside (teacher forcing): the embedding on
token ids, any global decoder layer on a hidden state, the final norm + lm_head on the last layer's output.

Each call reads only the rank files' tensors of that stage (every TP rank of it, joined by ``SimulatedCollectives``)
and returns TP rank 0's view, as ``run_simulated`` hands hidden states on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .blocks import rotary_cos_sin
from .collectives import SimulatedCollectives
from .rank_files import LAYER_PREFIX, RankWeights, ShardedCheckpoint


class StageRunner:
    """``ckpt``'s stages on ``device`` computing in ``dtype``, for sequences of ``seq_len`` tokens."""

    def __init__(self, ckpt: ShardedCheckpoint, device: torch.device, dtype: torch.dtype, seq_len: int) -> None:
        self.ckpt, self.cfg, self.device, self.dtype = ckpt, ckpt.config, device, dtype
        self.rope = rotary_cos_sin(self.cfg, seq_len, device)
        self.comm = SimulatedCollectives()
        self._stage_of = {layer: (p, j) for p in range(self.cfg.pp_size)
                          for j, layer in enumerate(self.cfg.stage_layers(p))}

    def _weights(self, pp_rank: int) -> list[RankWeights]:
        tp = self.cfg.tp_size
        return [self.ckpt.weights(pp_rank * tp + t, self.device, self.dtype) for t in range(tp)]

    def _copies(self, x: Tensor) -> list[Tensor]:
        return [x.to(self.device, self.dtype) for _ in range(self.cfg.tp_size)]

    def embed(self, ids: Tensor) -> Tensor:
        return self.ckpt.family.embed(ids.to(self.device), self._weights(0), self.cfg, self.comm)[0]

    def layer(self, index: int, x: Tensor) -> Tensor:
        """Global decoder layer ``index`` on the residual stream ``x`` [B, T, H]."""
        pp_rank, local = self._stage_of[index]
        ws = [w.scope(LAYER_PREFIX.format(local)) for w in self._weights(pp_rank)]
        return self.ckpt.family.layer(self._copies(x), ws, self.cfg, self.rope, self.comm)[0]

    def logits(self, x: Tensor) -> Tensor:
        """float32 logits from the last layer's output ``x``."""
        return self.ckpt.family.logits(self._copies(x), self._weights(self.cfg.pp_size - 1), self.cfg, self.comm)[0]
