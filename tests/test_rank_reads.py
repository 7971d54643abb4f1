"""RankReads: a tensor two readers declared is read once for both, and kept no longer than the second read."""

from __future__ import annotations

from pathlib import Path

import torch

from shardproof.verify.rank_reads import RankReads, rank_key


def test_a_tensor_both_declared_is_read_once_and_kept_only_until_the_second_read(tmp_path: Path) -> None:
    reads = RankReads()
    both, one = rank_key(tmp_path / "rank0.safetensors", "a", None), rank_key(tmp_path / "rank0.safetensors", "b", "cpu")
    reads.declare([both, one])
    reads.declare([both])
    calls: list[str] = []

    def read(name: str):
        def go() -> torch.Tensor:
            calls.append(name)
            return torch.full((2,), float(len(calls)))
        return go

    first = reads.read(both, read("a"))
    assert reads.read(both, read("a")) is first  # the second reader is handed the first read
    assert calls == ["a"] and not reads._kept  # and nothing is kept after it
    reads.read(both, read("a"))  # a third read (a check run again) reads, and keeps nothing
    reads.read(one, read("b"))
    reads.read(one, read("b"))  # declared by one reader only: read each time
    assert calls == ["a", "a", "b", "b"] and not reads._kept


def test_the_same_file_and_device_are_one_key_however_they_are_named(tmp_path: Path) -> None:
    assert rank_key(tmp_path / "x" / ".." / "r.safetensors", "a", None) == rank_key(tmp_path / "r.safetensors", "a", "cpu")
    assert rank_key(tmp_path / "r.safetensors", "a", "cpu") != rank_key(tmp_path / "r.safetensors", "b", "cpu")
