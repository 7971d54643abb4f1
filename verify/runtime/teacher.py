"""The checkpoint's stages run one at a time, in lock step with a reference model's run: each stage (the embedding
on token ids, any global decoder layer on a hidden state, the final norm + lm_head on the last layer's output) runs
on an input given from outside (teacher forcing) and, in the same step, carries on the runtime's own free runs from
the token ids in their compute dtypes, exactly as ``run_simulated`` would compute them.

Each step reads the stage's tensors of every TP rank once, as stored (``SharedReads``), and every run takes its
own cast of them; the reads are dropped when the step ends. So one pass over the rank files serves the
teacher-forced comparison and every free run, and memory holds one stage's tensors, not the model.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from shardproof.converter.errors import CheckNotRun

from .blocks import rotary_cos_sin
from .collectives import SimulatedCollectives
from ..rank_reads import RankReads, rank_key
from .rank_files import LAYER_PREFIX, RankFile, RankWeights, SharedReads, ShardedCheckpoint
from .stage import check_input_ids


class StageRunner:
    """``ckpt``'s stages on ``device`` for the token ids ``ids`` [B, T]: teacher-forced in ``dtype`` and, in lock
    step, a free run in each of ``free`` (compute dtypes). Steps come in order: ``embed()``, ``layer(0)`` ..
    ``layer(num_layers - 1)``, ``logits(x)``; then ``free_logits`` holds each free run's float32 logits.
    ``across``: reads shared with another reader of the rank files (``verify/rank_reads.py``)."""

    def __init__(self, ckpt: ShardedCheckpoint, device: torch.device, dtype: torch.dtype, ids: Tensor,
                 free: Sequence[torch.dtype] = (), across: RankReads | None = None) -> None:
        self.ckpt, self.cfg, self.device, self.dtype = ckpt, ckpt.config, device, dtype
        self.ids = check_input_ids(ids, self.cfg).to(device)
        self.rope = rotary_cos_sin(self.cfg, self.ids.shape[1], device)
        self.comm = SimulatedCollectives()
        self.free = tuple(free)
        self.free_logits: list[Tensor] = []
        self._streams: list[list[Tensor]] = []  # each free run's per-TP-rank hidden states
        self._next = 0  # the step expected next: 0 embedding, 1 + i layer i, 1 + num_layers the logits
        self._reads = SharedReads(across)
        if across is not None:  # every tensor of the rank files it reads directly, each once
            files = [ckpt.file(rank) for rank in range(self.cfg.world_size)]
            across.declare(rank_key(f.path, name, device) for rank, f in enumerate(files) if type(f) is RankFile
                           for name in ckpt.family.tensors(self.cfg, rank))
        self._stage_of = {layer: (p, j) for p in range(self.cfg.pp_size)
                          for j, layer in enumerate(self.cfg.stage_layers(p))}

    def _weights(self, pp_rank: int, dtype: torch.dtype, scope: str) -> list[RankWeights]:
        tp = self.cfg.tp_size
        return [self.ckpt.weights(pp_rank * tp + t, self.device, dtype, self._reads).scope(scope) for t in range(tp)]

    def _copies(self, x: Tensor) -> list[Tensor]:
        return [x.to(self.device, self.dtype) for _ in range(self.cfg.tp_size)]

    def embed(self) -> Tensor:
        """The embedding of ``ids`` (TP rank 0's view); the free runs start from it in their dtypes."""
        family, cfg = self.ckpt.family, self.cfg
        return self._together(0, 0, "", self.ids, [self.ids] * len(self.free),
                              lambda ids, ws: family.embed(ids, ws, cfg, self.comm))

    def layer(self, index: int, x: Tensor) -> Tensor:
        """Global decoder layer ``index`` on the residual stream ``x`` [B, T, H]; the free runs take the same
        layer on their own streams (TP rank t of stage p hands its hidden states to TP rank t of p + 1, as
        run_simulated does)."""
        pp_rank, local = self._stage_of[index]
        family, cfg = self.ckpt.family, self.cfg
        return self._together(1 + index, pp_rank, LAYER_PREFIX.format(local), self._copies(x), self._streams,
                              lambda xs, ws: family.layer(xs, ws, cfg, self.rope, self.comm))

    def logits(self, x: Tensor) -> Tensor:
        """float32 logits from the last layer's output ``x``; the free runs end with theirs (``free_logits``)."""
        family, cfg = self.ckpt.family, self.cfg
        out = self._together(1 + cfg.num_layers, cfg.pp_size - 1, "", self._copies(x), self._streams,
                             lambda xs, ws: family.logits(xs, ws, cfg, self.comm))
        self.free_logits, self._streams = [s[0] for s in self._streams], []
        return out

    def _together(self, step: int, pp_rank: int, scope: str, forced: Tensor | list[Tensor],
                  streams: list[Tensor | list[Tensor]], run: Callable[[Any, list[RankWeights]], list[Tensor]]) -> Tensor:
        """Step ``step``: ``run`` on the teacher's input ``forced`` in ``dtype``, then on each free run's stream in
        its dtype (kept as the new streams), every rank tensor of the stage read once; TP rank 0's teacher output."""
        if step != self._next:  # the reference skipped or repeated a layer: the stages cannot be compared in step
            raise CheckNotRun(f"the reference model ran stage {step} out of order (expected {self._next}); the "
                              "runtime's stages step with its layers")
        self._next += 1
        try:
            out = run(forced, self._weights(pp_rank, self.dtype, scope))[0]
            self._streams = [run(xs, self._weights(pp_rank, d, scope)) for xs, d in zip(streams, self.free)]
        finally:
            self._reads.clear()
        return out
