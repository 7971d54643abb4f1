"""The sharded mode's teacher-forced stages: each runtime stage runs on HF's own input to it, so a fault in one
layer shows at that layer alone, and the layers after it, fed HF's correct hidden states, agree again."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shardproof.converter.api import convert
from shardproof.verify.forward import BatchOptions
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
