"""Inverting the rank files reads each rank tensor once and holds a replicated tensor's copies two at a time, not
one per rank (at tp 8 a replicated 1 GiB embedding held 8 GiB in reassemble and verify)."""

from __future__ import annotations

import weakref
from collections import Counter

import torch

from shardproof.converter.api import convert
from shardproof.converter.reassemble import RankTensors, Rebuild
from shardproof.converter.target_checkpoint import open_checkpoint
from shardproof.converter.transforms import REPLICATED
from shardproof.verify.tiny_models import build_tiny_model


class Loads:
    """Rank-tensor loads that count themselves and how many loaded tensors are alive when each is made."""

    def __init__(self, load) -> None:
        self.load, self.calls, self.alive, self.most_alive = load, Counter(), 0, 0

    def __call__(self, *key) -> torch.Tensor:
        self.calls[key] += 1
        tensor = self.load(*key)
        self.alive += 1
        self.most_alive = max(self.most_alive, self.alive)
        weakref.finalize(tensor, self._freed)
        return tensor

    def _freed(self) -> None:
        self.alive -= 1


def test_a_replicas_copies_are_compared_two_at_a_time() -> None:
    copies = [torch.full((64, 8), 1.5) for _ in range(8)]
    copies[5][3, 2] = 2.0
    loads = Loads(lambda rank: copies[rank].clone())
    sources, problems = REPLICATED.inverse(RankTensors([lambda r=r: loads(r) for r in range(8)]), [(64, 8)])
    assert torch.equal(sources[0], copies[0])
    assert [rank for rank, _ in problems] == [5] and "first at index (3, 2)" in problems[0][1]
    assert loads.calls == Counter({(r,): 1 for r in range(8)})
    assert loads.most_alive == 2


def test_reassembly_reads_each_rank_tensor_once_and_holds_two_replicas(tmp_path) -> None:
    model = build_tiny_model(tmp_path / "model", "LlamaForCausalLM", seed=3, vocab_size=64)
    convert(model, tmp_path / "ckpt", dtype="bfloat16", tp_size=4)  # the embedding replicated on the 4 ranks
    ckpt = open_checkpoint(tmp_path / "ckpt", None, None)
    loads, violations = Loads(ckpt.load), []
    rebuild = Rebuild(ckpt, violations, None, loads)
    replicated = 0
    for group in ckpt.plan.groups():
        before = loads.most_alive = loads.alive
        given, _ = rebuild.group(group)
        if group[0].shard.kind == "replicated":
            replicated += 1
            assert loads.most_alive - before <= 2, group[0].name
        del given
    assert not violations and replicated
    every = {(ckpt.mapping.rank(t.tp_rank, g[0].pp_rank), t.name, None) for g in ckpt.plan.groups() for t in g}
    assert loads.calls == Counter(dict.fromkeys(every, 1))
