"""Both modes in one run share one lock step over the source (`verification._together`): the same verdicts and
figures as each mode run on its own, and a check that cannot run in the shared step is reported by the mode it
belongs to, the other mode still run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shardproof.converter.api import convert
from shardproof.converter.errors import CheckNotRun
from shardproof.verify.forward import BatchOptions
from shardproof.verify.outcomes import Status
from shardproof.verify.runtime.teacher import StageRunner
from shardproof.verify.tiny_models import build_tiny_model
from shardproof.verify.verification import verify_checkpoint

BATCH = BatchOptions(device="cpu", num_sequences=2, seq_len=16)
ON_DEVICES = pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the device paths run on a GPU only"))])


@pytest.mark.parametrize("architecture, layout", [
    ("LlamaForCausalLM", dict(dtype="bfloat16", tp_size=2)),
    ("GemmaForCausalLM", dict(dtype="bfloat16", tp_size=2, pp_size=2)),  # norms rounded: the expected run is apart
])
@ON_DEVICES
def test_both_modes_together_give_what_each_gives_alone(tmp_path: Path, architecture: str, layout: dict,
                                                        device: str) -> None:
    batch = BatchOptions(device=device, num_sequences=2, seq_len=16)
    model = build_tiny_model(tmp_path / "m", architecture, seed=4)
    convert(model, tmp_path / "c", **layout)
    both = verify_checkpoint(model, tmp_path / "c", "both", batch)
    alone = {mode: verify_checkpoint(model, tmp_path / "c", mode, batch) for mode in ("reassembled", "sharded")}
    assert both.status is Status.PASSED
    modes = [c for c in both.checks if c.mode != "manifest"]
    assert modes == [c for m in alone.values() for c in m.checks if c.mode != "manifest"] and len(modes) == 7
    r, r_alone = both.reassembled, alone["reassembled"].reassembled
    assert r.weights == r_alone.weights and r.forward == r_alone.forward and r.precision == r_alone.precision
    s, s_alone = both.sharded, alone["sharded"].sharded
    assert s.teacher_forced == s_alone.teacher_forced
    assert [c.metrics for c in s.comparisons] == [c.metrics for c in s_alone.comparisons]
    assert [c.own for c in s.comparisons] == [c.own for c in s_alone.comparisons]


def test_a_check_that_cannot_run_in_the_shared_step_is_its_own_modes_and_the_other_mode_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runtime gives up in the middle of the shared lock step (at layer 1): both modes run again apart, so the
    sharded mode is the one not run and the reassembled mode passes."""
    model = build_tiny_model(tmp_path / "m", "LlamaForCausalLM", seed=4)
    convert(model, tmp_path / "c", dtype="bfloat16", tp_size=2)
    layer = StageRunner.layer

    def gives_up(self: StageRunner, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 1:
            raise CheckNotRun("the runtime cannot run layer 1")
        return layer(self, index, x)

    monkeypatch.setattr(StageRunner, "layer", gives_up)
    result = verify_checkpoint(model, tmp_path / "c", "both", BATCH)
    assert result.status is Status.NOT_RUN
    assert result.not_run == {"sharded": "the runtime cannot run layer 1"}
    assert result.reassembled is not None and result.reassembled.passed


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "GemmaForCausalLM"])
def test_both_modes_read_each_rank_tensor_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               architecture: str) -> None:
    """The runtime and the rebuilt model each need every tensor of the rank files: in one run they share each read
    (`verify/rank_reads.py`), so every tensor is read once; apart, each mode reads it."""
    from collections import Counter

    from safetensors import safe_open

    from shardproof.converter.safetensors_io import TensorReader

    model = build_tiny_model(tmp_path / "m", architecture, seed=4)
    convert(model, tmp_path / "c", dtype="bfloat16", tp_size=2, pp_size=2)
    stored = Counter()
    for path in sorted((tmp_path / "c").glob("rank*.safetensors")):
        with safe_open(path, "pt") as f:
            stored.update((path.name, name) for name in f.keys())
    reads, read = Counter(), TensorReader.read

    def counted(self: TensorReader, name: str) -> torch.Tensor:
        if self.path.name.startswith("rank"):
            reads[(self.path.name, name)] += 1
        return read(self, name)

    monkeypatch.setattr(TensorReader, "read", counted)
    assert verify_checkpoint(model, tmp_path / "c", "both", BATCH).status is Status.PASSED
    assert reads == stored
    reads.clear()
    for mode in ("reassembled", "sharded"):
        assert verify_checkpoint(model, tmp_path / "c", mode, BATCH).status is Status.PASSED
    assert reads == Counter({key: 2 for key in stored})


@ON_DEVICES
def test_a_faulty_conversion_fails_the_same_way_together_and_apart(tmp_path: Path, device: str) -> None:
    """Gate and up swapped in layer 1 of every rank file (a fault the converter and reassembler could share): both
    modes fail, together as apart, with the same reasons, the same differing tensors and the same localizations."""
    from safetensors.torch import load_file, save_file

    model = build_tiny_model(tmp_path / "m", "LlamaForCausalLM", seed=4)
    convert(model, tmp_path / "c", dtype="float32", tp_size=2)
    for path in (tmp_path / "c").glob("rank*.safetensors"):
        tensors = load_file(path)
        fc, gate = "transformer.layers.1.mlp.fc.weight", "transformer.layers.1.mlp.gate.weight"
        tensors[fc], tensors[gate] = tensors[gate], tensors[fc]
        save_file(tensors, path)
    (tmp_path / "c" / "shardproof-manifest.json").unlink()  # the faulty converter's own files, no manifest
    batch = BatchOptions(device=device, num_sequences=2, seq_len=16)
    both = verify_checkpoint(model, tmp_path / "c", "both", batch)
    alone = {mode: verify_checkpoint(model, tmp_path / "c", mode, batch) for mode in ("reassembled", "sharded")}
    assert both.status is Status.FAILED
    assert both.failures == alone["reassembled"].failures + alone["sharded"].failures and len(both.failures) >= 3
    r, r_alone = both.reassembled, alone["reassembled"].reassembled
    assert r.weights == r_alone.weights and {t.name for t in r.weights.mismatches} == {
        "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"}
    assert r.forward == r_alone.forward and r.localization == r_alone.localization
    assert r.localization.module == "model.layers.1.mlp.gate_proj"
    s, s_alone = both.sharded, alone["sharded"].sharded
    assert s.teacher_forced == s_alone.teacher_forced and s.teacher_forced.first_beyond == "layer 1"
    assert s.localization == s_alone.localization


def test_what_a_failed_shared_step_held_is_freed_before_the_modes_run_apart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared step runs out of device memory at layer 1: the reference it built (and the runs it holds on the
    device) sits in reference cycles, and must be gone when the modes run apart, or they run beside it (at 8B
    under a quarter-model cap the reassembled mode then ran out of memory, where alone it passes)."""
    import gc
    import weakref

    from shardproof.verify import sharded_check, verification

    model = build_tiny_model(tmp_path / "m", "LlamaForCausalLM", seed=4)
    convert(model, tmp_path / "c", dtype="bfloat16", tp_size=2)
    references: list[weakref.ref] = []
    init, layer, alone = sharded_check.HFReference.__init__, StageRunner.layer, verification.verify_equivalence

    def recorded(self: sharded_check.HFReference, *args, **kwargs) -> None:
        references.append(weakref.ref(self))
        init(self, *args, **kwargs)

    def runs_out(self: StageRunner, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 1 and len(references) == 1:
            raise torch.OutOfMemoryError("out of memory in the shared step")
        return layer(self, index, x)

    alive_when_apart: list[bool] = []

    def apart(*args, **kwargs):
        alive_when_apart.append(references[0]() is not None)
        return alone(*args, **kwargs)

    monkeypatch.setattr(sharded_check.HFReference, "__init__", recorded)
    monkeypatch.setattr(StageRunner, "layer", runs_out)
    monkeypatch.setattr(verification, "verify_equivalence", apart)
    gc.disable()  # collection only where the code asks for it
    try:
        result = verify_checkpoint(model, tmp_path / "c", "both", BATCH)
    finally:
        gc.enable()
    assert result.status is Status.PASSED
    assert alive_when_apart == [True, False]  # the shared step's own call, then the reassembled mode's apart
