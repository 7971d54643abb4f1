"""Issue 13 item 3: a float16 overflow or a NaN/Inf in the source is refused before any output appears, unless
--allow-nonfinite (converted as it is, and said so) or --clamp (saturated, and counted)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from shardproof.cli import app
from shardproof.converter.api import convert
from shardproof.converter.errors import ShardproofError
from shardproof.converter.reassemble import reassemble
from tests.helpers import random_checkpoint
from tests.hostile_cases import SMALL, stagings

TENSOR = "model.layers.1.mlp.down_proj.weight"
STORED = "transformer.layers.0.mlp.proj.weight"  # pp=2: layer 1 is the second stage's layer 0 (rank 1)


def with_values(tmp_path: Path, *values: float) -> Path:
    """A tiny Llama whose TENSOR starts with `values`."""
    model = random_checkpoint(tmp_path / "hf", "LlamaForCausalLM", seed=0, **SMALL)
    tensors = load_file(model / "model.safetensors")
    tensors[TENSOR].view(-1)[: len(values)] = torch.tensor(values)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    return model


def cli(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("values, fragments", [
    ((7.0e4, -1.0e5), ("2 value(s) beyond float16's finite range ±65504", "max |value| 100000", "--clamp")),
    ((math.nan, math.inf), ("2 non-finite value(s)", "--allow-nonfinite")),
])
def test_refused_with_the_tensor_count_and_peak_and_nothing_written(tmp_path, values, fragments):
    model, out = with_values(tmp_path, *values), tmp_path / "out"
    result = cli("convert", "--model_dir", model, "--output_dir", out, "--dtype", "float16", "--pp_size", "2")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and TENSOR in lines[0] and str(model) in lines[0], result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not out.exists() and not stagings(out)


def test_nan_is_refused_in_float32_too(tmp_path):
    with pytest.raises(ShardproofError, match="1 non-finite"):
        convert(with_values(tmp_path, math.nan), tmp_path / "out", dtype="float32")


def test_in_range_values_convert_untouched(tmp_path):
    model = with_values(tmp_path, 65504.0, -65504.0)
    convert(model, tmp_path / "out", dtype="float16", clamp=True)
    assert load_file(tmp_path / "out" / "rank0.safetensors")["transformer.layers.1.mlp.proj.weight"].view(-1)[:2].tolist() == [65504.0, -65504.0]


def test_allow_nonfinite_converts_them_as_they_are_and_says_so(tmp_path):
    model, out = with_values(tmp_path, 7.0e4, math.nan), tmp_path / "out"
    result = cli("convert", "--model_dir", model, "--output_dir", out, "--dtype", "float16", "--pp_size", "2", "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    assert "converted 2 non-finite value(s) as they are" in result.stderr and TENSOR in result.stderr
    stored = load_file(out / "rank1.safetensors")[STORED].view(-1)
    assert stored[0] == math.inf and math.isnan(stored[1])
    assert reassemble(out, tmp_path / "back").ok  # stored as written: the reassembler gives the same values back


def test_clamp_saturates_and_counts(tmp_path):
    model, out = with_values(tmp_path, 7.0e4, -1.0e5, 3.0), tmp_path / "out"
    result = cli("convert", "--model_dir", model, "--output_dir", out, "--dtype", "float16", "--pp_size", "2", "--clamp")
    assert result.exit_code == 0, result.output
    assert f"clamped 2 out-of-range value(s)" in result.stderr and f"{TENSOR} (2)" in result.stderr
    reference = load_file(model / "model.safetensors")[TENSOR].to(torch.float16).view(-1)
    stored = load_file(out / "rank1.safetensors")[STORED].view(-1)
    assert stored[:3].tolist() == [65504.0, -65504.0, 3.0]
    assert torch.equal(stored[3:], reference[3:])  # every in-range value cast exactly as without --clamp


def test_clamp_does_not_admit_nan(tmp_path):
    with pytest.raises(ShardproofError, match="non-finite"):
        convert(with_values(tmp_path, math.nan), tmp_path / "out", dtype="float16", clamp=True)


def test_check_takes_the_flags(tmp_path):
    model = with_values(tmp_path, 7.0e4)
    refused = cli("check", "--model_dir", model, "--dtype", "float16", "--device", "cpu", "--num_sequences", "1", "--seq_len", "8")
    assert refused.exit_code == 2 and "beyond float16's finite range" in refused.stderr
    clamped = cli("check", "--model_dir", model, "--dtype", "float16", "--device", "cpu", "--num_sequences", "1", "--seq_len", "8",
                  "--clamp", "--mode", "sharded")
    assert "clamped 1 out-of-range value(s)" in clamped.stderr
    assert clamped.exit_code in (0, 1), clamped.output  # converted; whether 65504 is faithful enough is the verifier's call
