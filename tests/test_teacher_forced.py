"""The sharded mode's teacher-forced stages: each runtime stage runs on HF's own input to it, so a fault in one
layer shows at that layer alone, and the layers after it, fed HF's correct hidden states, agree again; and the runtime's free runs,
stepped with it, are run_simulated's from one read of the rank files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shardproof.converter.api import convert
from shardproof.converter.card import supported_architectures
from shardproof.converter.errors import CheckNotRun
from shardproof.verify.forward import BatchOptions
from shardproof.verify.runtime.rank_files import RankFile, ShardedCheckpoint
from shardproof.verify.runtime.simulated import run_simulated
from shardproof.verify.runtime.teacher import StageRunner
from shardproof.verify.sharded_check import CONVERSION_REL_ERROR, FINAL_STAGE, sharded_check
from shardproof.verify.tiny_models import build_tiny_model

BATCH = BatchOptions("cpu", num_sequences=2, seq_len=32)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tf") / "m", "LlamaForCausalLM", seed=4, num_hidden_layers=4)


def _labels(layers: int) -> list[str]:
    return ["embedding", *(f"layer {i}" for i in range(layers)), FINAL_STAGE]


def test_a_clean_checkpoint_agrees_at_every_stage(model, tmp_path) -> None:
    convert(model, tmp_path / "ckpt", dtype="bfloat16", tp_size=2, pp_size=2)
    report = sharded_check(model, tmp_path / "ckpt", BATCH)
    assert report.passed, report.failures
    forced = report.teacher_forced
    assert [e.stage for e in forced.stages] == _labels(4)
    assert forced.first_beyond is None
    assert all(e.relative_error < CONVERSION_REL_ERROR / 10 for e in forced.stages)


def test_a_fault_in_one_layer_shows_there_alone(model, tmp_path) -> None:
    """Layer 2 (local layer 0 of the second stage) gets a scaled MLP weight on one TP rank: only layer 2's own
    error is large; the end-to-end logits fail too."""
    ckpt = tmp_path / "ckpt"
    convert(model, ckpt, dtype="float32", tp_size=2, pp_size=2)
    path = ckpt / "rank3.safetensors"  # tp rank 1 of pp stage 1
    tensors = load_file(path)
    name = "transformer.layers.0.mlp.proj.weight"
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, path)
    report = sharded_check(model, ckpt, BATCH)
    assert not report.passed
    errors = {e.stage: e.relative_error for e in report.teacher_forced.stages}
    assert report.teacher_forced.first_beyond == "layer 2"
    assert errors["layer 2"] > 100 * CONVERSION_REL_ERROR
    assert all(errors[s] < CONVERSION_REL_ERROR / 10 for s in _labels(4) if s != "layer 2")
    assert report.localization.first_diverging == "layer 2"


@pytest.mark.parametrize("architecture", supported_architectures())
def test_the_free_runs_are_run_simulated_and_each_rank_tensor_is_read_once(architecture, tmp_path, monkeypatch):
    """Stepping the runner stage by stage (teacher forced on arbitrary inputs) gives, for its free runs in the
    checkpoint dtype and in float32, run_simulated's logits bit for bit, from one read of each rank tensor."""
    source = build_tiny_model(tmp_path / "m", architecture, seed=5, num_hidden_layers=3)
    ckpt_dir = tmp_path / "ckpt"
    convert(source, ckpt_dir, dtype="bfloat16", tp_size=2, pp_size=2)
    ckpt = ShardedCheckpoint(ckpt_dir)
    ids = torch.randint(0, ckpt.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = [run_simulated(ckpt, ids), run_simulated(ckpt, ids, compute_dtype=torch.float32)]
    reads: list[tuple[Path, str]] = []
    read = RankFile.read
    monkeypatch.setattr(RankFile, "read", lambda self, name, *a, **k: reads.append((self.path, name)) or read(self, name, *a, **k))
    runner = StageRunner(ckpt, torch.device("cpu"), torch.float32, ids, (torch.bfloat16, torch.float32))
    x = runner.embed()
    noise = torch.Generator().manual_seed(1)
    for index in range(ckpt.config.num_layers):
        runner.layer(index, x + torch.randn(x.shape, generator=noise))
    runner.logits(x)
    assert all(torch.equal(a, b) for a, b in zip(runner.free_logits, expected, strict=True))
    stored = [(ckpt.rank_path(r), n) for r in range(ckpt.config.world_size) for n in ckpt.file(r).shapes]
    assert sorted(reads) == sorted(stored)


def test_steps_out_of_order_are_refused(model, tmp_path) -> None:
    convert(model, tmp_path / "ckpt", dtype="float32", tp_size=2)
    ckpt = ShardedCheckpoint(tmp_path / "ckpt")
    runner = StageRunner(ckpt, torch.device("cpu"), torch.float32, torch.zeros(1, 4, dtype=torch.long))
    x = runner.embed()
    with pytest.raises(CheckNotRun, match="out of order"):
        runner.layer(1, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_embedding_rows_gathered_before_the_cast_are_the_cast_tables_rows(model, tmp_path, dtype) -> None:
    """`RankWeights.rows` gathers from the stored table and casts the rows: the values of gathering from the table
    cast whole, bit for bit, including for ids at both ends of the vocabulary."""
    convert(model, tmp_path / "ckpt", dtype="bfloat16", tp_size=2, use_parallel_embedding=True)
    ckpt = ShardedCheckpoint(tmp_path / "ckpt")
    ids = torch.tensor([[0, 1, ckpt.config.vocab_size // 2, ckpt.config.vocab_size - 1]])
    for rank in range(ckpt.config.world_size):
        w = ckpt.weights(rank, "cpu", dtype)
        name = "transformer.vocab_embedding.weight"
        local = ids.clamp(0, w.shape(name)[0] - 1)
        rows = w.rows(name, local)
        assert rows.dtype == dtype and torch.equal(rows, torch.nn.functional.embedding(local, w[name]))
