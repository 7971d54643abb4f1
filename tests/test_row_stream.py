"""The streamed row instances (converter/row_stream.py) write the bytes, and the manifest the digests, of the
whole-tensor path, for every card in every target and layout, with blocks of any size; a value that is not finite
sends its tensor the whole way, with the same errors and notes."""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import shardproof.converter.execute as execute
import shardproof.converter.row_stream as row_stream
from shardproof.converter.api import convert
from shardproof.converter.card import cards
from shardproof.converter.errors import ShardproofError
from shardproof.converter.plan import PlannedTensor
from shardproof.converter.source import Source
from shardproof.converter.target import targets_for
from shardproof.converter.transforms import ADD_ONE, Split
from tests.helpers import random_checkpoint

# (label, convert's layout, config overrides): the vocabulary (97) is padded at every tp > 1
LAYOUTS = [
    ("tp1", dict(dtype="float16"), {}),
    ("tp2-pp2", dict(dtype="bfloat16", tp_size=2, pp_size=2), {}),
    ("tp3", dict(dtype="float16", tp_size=3),
     dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, intermediate_size=96)),
    ("tp4-parallel-embedding", dict(dtype="float16", tp_size=4, use_parallel_embedding=True), {}),
    ("tp2-embedding-dim1", dict(dtype="float32", tp_size=2, use_parallel_embedding=True, embedding_sharding_dim=1), {}),
    ("tp2-tied", dict(dtype="float16", tp_size=2), dict(tie_word_embeddings=True)),
]
CASES = [(card.name, target.name, label, layout, overrides)
         for card in cards() for target in targets_for(card) for label, layout, overrides in LAYOUTS]


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def converted(model: Path, out: Path, monkeypatch, streamed: bool, block: int | None = None, **layout) -> int:
    """Convert `model` into `out` streamed (blocks of `block` elements) or all the whole way; the number of row
    instances streamed."""
    count = 0
    write_streamed = row_stream.write_streamed

    def counting(*args) -> bool:
        nonlocal count
        wrote = write_streamed(*args)
        count += wrote
        return wrote

    with monkeypatch.context() as patch:
        patch.setattr(execute, "write_streamed", counting)
        if not streamed:
            patch.setattr(execute, "stream_slices", lambda tensors, tp: None)
        if block is not None:
            patch.setattr(row_stream, "BLOCK", block)
        convert(model, out, workers=2, **layout)
    return count


def same_as_whole(model: Path, tmp_path: Path, monkeypatch, block: int | None = None, **layout) -> int:
    """Convert streamed and whole; assert every output file has the same bytes; the instances streamed."""
    count = converted(model, tmp_path / "streamed", monkeypatch, True, block, **layout)
    assert converted(model, tmp_path / "whole", monkeypatch, False, **layout) == 0
    streamed, whole = files(tmp_path / "streamed"), files(tmp_path / "whole")
    assert streamed.keys() == whole.keys()
    for name in whole:
        assert streamed[name] == whole[name], name  # rank files, config.json, the manifest with every digest
    return count


@pytest.mark.parametrize("architecture, target, label, layout, overrides", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_every_card_target_and_layout_writes_the_whole_paths_bytes(architecture, target, label, layout, overrides,
                                                                   tmp_path, monkeypatch):
    model = random_checkpoint(tmp_path / "hf", architecture, seed=5, dtype="bfloat16", shards=2, **overrides)
    try:
        count = same_as_whole(model, tmp_path, monkeypatch, block=200, target=target, **layout)
    except ShardproofError as e:  # a layout the card or target refuses is refused the same way by both paths
        with pytest.raises(ShardproofError) as whole:
            converted(model, tmp_path / "refused", monkeypatch, False, target=target, **layout)
        assert str(whole.value) == str(e)
        pytest.skip(f"refused: {e}")
    assert count > 0  # the comparison is not of the whole path with itself


@pytest.mark.parametrize("block", [1, 7, 64, 200, 1000, None])
@pytest.mark.parametrize("source_dtype, dtype", [("bfloat16", "float16"), ("float32", "bfloat16"),
                                                 ("float16", "float16")])
def test_blocks_of_any_size_give_the_same_bytes(block, source_dtype, dtype, tmp_path, monkeypatch):
    # hidden 64, intermediate 96, vocab 97: a block of 1 element holds one row of every matrix, 7 several elements of
    # a 1-D norm and a last partial block, 200 several rows and a partial last one, None (the default) whole tensors
    model = random_checkpoint(tmp_path / "hf", "LlamaForCausalLM", seed=1, dtype=source_dtype)
    assert same_as_whole(model, tmp_path, monkeypatch, block, dtype=dtype, tp_size=4, pp_size=2,
                         use_parallel_embedding=True) > 0


TENSOR = "model.layers.1.mlp.down_proj.weight"  # row-parallel: each rank's part of a row is a run of its columns


def with_values(tmp_path: Path, values: list[float], at: int) -> Path:
    """A tiny Llama (bfloat16) whose TENSOR holds `values` from flat index `at` (negative: from the end)."""
    model = random_checkpoint(tmp_path / "hf", "LlamaForCausalLM", seed=0, dtype="bfloat16")
    tensors = load_file(model / "model.safetensors")
    flat = tensors[TENSOR].view(-1)
    start = at % flat.numel()
    flat[start : start + len(values)] = torch.tensor(values)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    return model


BAD = [([7.0e4, -1.0e5], 0), ([math.nan, math.inf], -2), ([-math.inf], 3000)]


@pytest.mark.parametrize("values, at", BAD, ids=["overflow-first-block", "nonfinite-last-block", "inf-mid"])
def test_a_bad_value_is_refused_with_the_whole_paths_error(values, at, tmp_path, monkeypatch):
    model = with_values(tmp_path, values, at)
    errors = []
    for streamed in (True, False):
        with pytest.raises(ShardproofError) as raised:
            converted(model, tmp_path / f"out{streamed}", monkeypatch, streamed, block=200, dtype="float16", tp_size=2)
        errors.append(str(raised.value))
        assert not (tmp_path / f"out{streamed}").exists()
    assert errors[0] == errors[1] and TENSOR in errors[0]


@pytest.mark.parametrize("flag", ["allow_nonfinite", "clamp"])
@pytest.mark.parametrize("values, at", BAD, ids=["overflow-first-block", "nonfinite-last-block", "inf-mid"])
def test_a_bad_value_passed_by_a_flag_gives_the_whole_paths_bytes_and_notes(values, at, flag, tmp_path, monkeypatch):
    model = with_values(tmp_path, values, at)
    notes: dict[bool, list[str]] = {True: [], False: []}
    outputs = {}
    for streamed in (True, False):
        outputs[streamed] = tmp_path / f"out{streamed}"
        try:
            converted(model, outputs[streamed], monkeypatch, streamed, block=200, dtype="float16", tp_size=2,
                      note=notes[streamed].append, **{flag: True})
        except ShardproofError as e:  # --clamp alone does not pass NaN or inf in the source
            assert flag == "clamp" and "non-finite" in str(e)
            outputs.pop(streamed)
    assert notes[True] == notes[False]
    if outputs:
        assert files(outputs[True]) == files(outputs[False])
        assert notes[True] and TENSOR in notes[True][0]


def test_fallbacks_to_the_whole_path_run_one_at_a_time(tmp_path, monkeypatch):
    # a streamed instance holds a few blocks and is budgeted so; one that falls back holds its whole tensors, which
    # the budget leaves out: so fallbacks take turns, whatever the workers
    model = random_checkpoint(tmp_path / "hf", "LlamaForCausalLM", seed=2, dtype="bfloat16")
    fallback, lock = threading.local(), threading.Lock()
    running, most, fallbacks = 0, 0, 0

    def refusing(*args) -> bool:  # as if every block held a value that is not finite
        fallback.active = True
        return False

    load = Source.load

    def slow_load(self, name, *args):
        nonlocal running, most, fallbacks
        if not getattr(fallback, "active", False):
            return load(self, name, *args)
        fallback.active = False
        with lock:
            running, fallbacks = running + 1, fallbacks + 1
            most = max(most, running)
        time.sleep(0.01)
        with lock:
            running -= 1
        return load(self, name, *args)

    monkeypatch.setattr(execute, "write_streamed", refusing)
    monkeypatch.setattr(Source, "load", slow_load)
    convert(model, tmp_path / "out", dtype="float16", tp_size=2, workers=4)
    assert fallbacks > 4 and most == 1
    monkeypatch.undo()
    convert(model, tmp_path / "streamed", dtype="float16", tp_size=2, workers=4)
    assert files(tmp_path / "out") == files(tmp_path / "streamed")


@dataclasses.dataclass(frozen=True)
class Reversed(Split):
    """A column split whose forward gives the ranks in reverse order: its rank_slice no longer describes it."""

    def forward(self, sources, tp, tp_rank):
        return super().forward(sources, tp, tp - 1 - tp_rank)


def test_only_a_shard_whose_forward_is_its_slice_streams():
    def instance(shard, ops=()):
        return [PlannedTensor("t", (4, 2), "float16", ("s",), ((8, 2),), shard, r, 0, ops) for r in range(2)]

    assert row_stream.stream_slices(instance(Split(0)), 2) == ((0, 0, 4), (0, 4, 8))
    assert row_stream.stream_slices(instance(Reversed(0)), 2) is None  # its forward is applied whole
    assert row_stream.stream_slices(instance(Split(0), (ADD_ONE,)), 2) is None  # an op that rounds goes whole
