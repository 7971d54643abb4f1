"""Phi-3: the fused projections re-split per rank, longrope carried in TensorRT-LLM's long_rope fields, and
the check over a sequence past original_max_position_embeddings (the long-factor branch)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig
from typer.testing import CliRunner

from shardproof.cli import app
from shardproof.converter.api import convert
from shardproof.converter.cards.phi3 import LONGROPE_128K
from shardproof.converter.reassemble import reassemble
from shardproof.verify.equivalence import same_rope
from shardproof.verify.forward import BatchOptions
from shardproof.verify.mutations import fused_column_split_naively, longrope_factors_dropped, longrope_factors_swapped
from shardproof.verify.sharded_check import HFReference, check_sharded
from shardproof.verify.tiny_models import build_tiny_model

ARCH = "Phi3ForCausalLM"
ORIGINAL = LONGROPE_128K["original_max_position_embeddings"]
LONG_BATCH = BatchOptions("cpu", num_sequences=1, seq_len=4 * ORIGINAL)  # in the long range


@pytest.fixture(scope="module")
def phi3_128k(tmp_path_factory) -> Path:
    """A tiny Phi-3 with the 128k config's longrope factors (shrunk), GQA (4 heads, 2 KV heads)."""
    return build_tiny_model(tmp_path_factory.mktemp("phi3") / "hf", ARCH, seed=3, rope_parameters=dict(LONGROPE_128K),
                            original_max_position_embeddings=ORIGINAL)


@pytest.fixture(scope="module")
def phi3_tp2(phi3_128k, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phi3_tp2") / "trt"
    convert(phi3_128k, out, dtype="float32", tp_size=2)
    return out


def test_config_carries_longrope_as_trtllm_names_it(phi3_128k, phi3_tp2) -> None:
    cfg = json.loads((phi3_tp2 / "config.json").read_text())
    assert cfg["hidden_act"] == "swiglu" and cfg["rotary_scaling"] is None
    assert cfg["position_embedding_type"] == "long_rope"
    assert cfg["original_max_position_embeddings"] == ORIGINAL
    assert cfg["longrope_scaling_short_factors"] == LONGROPE_128K["short_factor"]
    assert cfg["longrope_scaling_long_factors"] == LONGROPE_128K["long_factor"]
    factor = cfg["max_position_embeddings"] / ORIGINAL  # 512 / 64: transformers' default attention factor
    assert cfg["longrope_short_mscale"] == cfg["longrope_long_mscale"] == math.sqrt(1 + math.log(factor) / math.log(ORIGINAL))


def test_reassembled_config_gives_transformers_the_same_rope(phi3_128k, phi3_tp2, tmp_path) -> None:
    assert reassemble(phi3_tp2, tmp_path / "back").ok
    source, rebuilt = AutoConfig.from_pretrained(phi3_128k), AutoConfig.from_pretrained(tmp_path / "back")
    assert rebuilt.rope_parameters["rope_type"] == "longrope" and same_rope(source, rebuilt)
    swapped = AutoConfig.from_pretrained(tmp_path / "back")
    swapped.rope_parameters = {**rebuilt.rope_parameters, "short_factor": rebuilt.rope_parameters["long_factor"],
                               "long_factor": rebuilt.rope_parameters["short_factor"]}
    assert not same_rope(source, swapped)


def test_su_rope_is_carried_as_longrope(tmp_path) -> None:
    """Older Phi-3 configs name longrope `su`; transformers reads it as longrope, so does the converter."""
    su = {k: v for k, v in LONGROPE_128K.items() if k != "rope_type"} | {"type": "su"}
    src = build_tiny_model(tmp_path / "hf", ARCH, seed=1, rope_scaling=su, rope_parameters=None,
                           original_max_position_embeddings=ORIGINAL)
    convert(src, tmp_path / "trt", dtype="float32")
    cfg = json.loads((tmp_path / "trt" / "config.json").read_text())
    assert cfg["position_embedding_type"] == "long_rope"
    assert cfg["longrope_scaling_long_factors"] == LONGROPE_128K["long_factor"]


def test_fc_is_up_then_gate_per_rank(phi3_128k, phi3_tp2) -> None:
    gate_up = load_file(phi3_128k / "model.safetensors")["model.layers.0.mlp.gate_up_proj.weight"]
    gate, up = gate_up.chunk(2)
    for r in range(2):
        fc = load_file(phi3_tp2 / f"rank{r}.safetensors")["transformer.layers.0.mlp.fc.weight"]
        assert torch.equal(fc, torch.cat([up.chunk(2)[r], gate.chunk(2)[r]]))


def _sharded(model_dir: Path, checkpoint: Path):
    return check_sharded(checkpoint, HFReference(model_dir, LONG_BATCH))


def test_naive_split_of_the_hf_gate_up_tensor_is_caught(phi3_128k, phi3_tp2, tmp_path) -> None:
    """gate_up_proj split on dim 0 as one tensor: rank 0 holds gate rows only; the sharded mode fails it."""
    bad = Path(shutil.copytree(phi3_tp2, tmp_path / "bad"))
    hf = load_file(phi3_128k / "model.safetensors")
    for r in range(2):
        path = bad / f"rank{r}.safetensors"
        tensors = load_file(path)
        for layer in range(3):
            gate_up = hf[f"model.layers.{layer}.mlp.gate_up_proj.weight"]
            tensors[f"transformer.layers.{layer}.mlp.fc.weight"] = gate_up.chunk(2)[r].contiguous()
        save_file(tensors, path)
    assert torch.equal(load_file(bad / "rank0.safetensors")["transformer.layers.0.mlp.fc.weight"],
                       hf["model.layers.0.mlp.gate_up_proj.weight"][:96])  # intermediate_size 96: gate only
    assert _sharded(phi3_128k, phi3_tp2).passed
    report = _sharded(phi3_128k, bad)
    assert not report.passed and report.localization.first_diverging == "layer 0"


@pytest.mark.parametrize("mutant", [fused_column_split_naively, longrope_factors_swapped, longrope_factors_dropped],
                         ids=["fused-column-naive", "factors-swapped", "factors-dropped"])
def test_mutants_are_caught_in_the_long_range(phi3_128k, phi3_tp2, tmp_path, mutant) -> None:
    bad = Path(shutil.copytree(phi3_tp2, tmp_path / "bad"))
    mutant(bad, phi3_128k)
    report = _sharded(phi3_128k, bad)
    assert not report.passed and report.localization.first_diverging == "layer 0"


def test_cli_check_fp16_tp2_passes_in_the_long_range(phi3_128k, tmp_path) -> None:
    """`shardproof check --dtype float16 --tp_size 2` over 256-token sequences, past original length 64."""
    result = CliRunner().invoke(app, ["check", "--model_dir", str(phi3_128k), "--output_dir", str(tmp_path / "out"),
                                      "--dtype", "float16", "--tp_size", "2", "--device", "cpu",
                                      "--num_sequences", "2", "--seq_len", str(4 * ORIGINAL)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["position_embedding_type"] == "long_rope"
