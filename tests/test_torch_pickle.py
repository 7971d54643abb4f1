"""PyTorch pickle sources (`pytorch_model.bin`, a sharded .bin index, `*.pth`): read only with --allow-pickle,
through torch.load(weights_only=True, mmap=True); they convert to the same rank files as the safetensors copy of
the same tensors, and verify (whose HF-side model is built from the tensors the loader reads) passes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from shardproof.cli import app
from shardproof.verify.tiny_models import build_tiny_model
from tests.helpers import load_checkpoint


def run(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def pickle_copy(model: Path, directory: Path, layout: str) -> Path:
    """`model`'s config and tensors with the weights as `layout`: one pytorch_model.bin, two .bin shards and
    their index, or one .pth file."""
    tensors = load_checkpoint(model)
    directory.mkdir()
    shutil.copy(model / "config.json", directory / "config.json")
    if layout == "bin":
        torch.save(tensors, directory / "pytorch_model.bin")
    elif layout == "pth":
        torch.save(tensors, directory / "consolidated.pth")
    else:
        names = sorted(tensors)
        weight_map = {}
        for i, part in enumerate((names[::2], names[1::2])):
            file = f"pytorch_model-0000{i + 1}-of-00002.bin"
            torch.save({n: tensors[n] for n in part}, directory / file)
            weight_map |= dict.fromkeys(part, file)
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "hf", "LlamaForCausalLM", seed=3, attention_bias=True)


def rank_bytes(checkpoint: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(checkpoint.glob("rank*.safetensors"))} | {
        "config.json": (checkpoint / "config.json").read_bytes()}


@pytest.mark.parametrize("layout", ["bin", "sharded-bin", "pth"])
def test_pickle_weights_convert_to_the_rank_files_of_their_safetensors_copy(tiny, tmp_path, layout) -> None:
    source = pickle_copy(tiny, tmp_path / "pickle", layout)
    layout_args = ("--tp_size", "2", "--pp_size", "2", "--dtype", "bfloat16")
    assert run("convert", "--model_dir", tiny, "--output_dir", tmp_path / "a", *layout_args).exit_code == 0
    result = run("convert", "--model_dir", source, "--output_dir", tmp_path / "b", "--allow-pickle", *layout_args)
    assert result.exit_code == 0, result.output
    assert rank_bytes(tmp_path / "a") == rank_bytes(tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "shardproof-manifest.json").read_text())
    assert set(manifest["source"]) == {p.name for p in source.iterdir()}  # every file read is fingerprinted


def test_pickle_weights_are_refused_without_consent(tiny, tmp_path) -> None:
    source = pickle_copy(tiny, tmp_path / "pickle", "bin")
    result = run("convert", "--model_dir", source, "--output_dir", tmp_path / "out")
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pytorch_model.bin" in lines[0] and "--allow-pickle" in lines[0], lines


def test_safetensors_are_read_before_pickle_in_the_same_directory(tiny, tmp_path) -> None:
    both = pickle_copy(tiny, tmp_path / "both", "bin")
    shutil.copy(tiny / "model.safetensors", both / "model.safetensors")
    result = run("convert", "--model_dir", both, "--output_dir", tmp_path / "out")  # no consent needed
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "shardproof-manifest.json").read_text())
    assert set(manifest["source"]) == {"config.json", "model.safetensors"}


@pytest.mark.parametrize("content, fragment", [
    ({"model": {"nested": torch.zeros(2)}}, "not a flat state dict"),
    ({"model.norm.weight": torch.ones(2, dtype=torch.int64)}, "only float32, float16 and bfloat16"),
])
def test_a_pickle_that_is_not_a_float_state_dict_is_bad_input(tiny, tmp_path, content, fragment) -> None:
    source = pickle_copy(tiny, tmp_path / "pickle", "bin")
    torch.save(content, source / "pytorch_model.bin")
    result = run("convert", "--model_dir", source, "--output_dir", tmp_path / "out", "--allow-pickle")
    assert result.exit_code == 2 and fragment in result.stderr and "pytorch_model.bin" in result.stderr, result.output


def test_a_pickle_with_an_arbitrary_object_is_refused_by_weights_only(tiny, tmp_path) -> None:
    source = pickle_copy(tiny, tmp_path / "pickle", "bin")
    torch.save({"model.norm.weight": torch.ones(2), "hook": Path("/")}, source / "pytorch_model.bin")
    result = run("convert", "--model_dir", source, "--output_dir", tmp_path / "out", "--allow-pickle")
    assert result.exit_code == 2 and "weights_only=True" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "MixtralForCausalLM"])
def test_verify_passes_on_a_pickle_source(tmp_path, architecture) -> None:
    """The HF-side model is built from the config and the tensors the pickle loader reads (Mixtral: transformers
    fuses the experts from them as it does from safetensors)."""
    model = build_tiny_model(tmp_path / "hf", architecture, seed=1)
    source = pickle_copy(model, tmp_path / "pickle", "bin")
    args = ("--model_dir", source, "--device", "cpu", "--num_sequences", "1", "--seq_len", "32", "--tp_size", "2",
            "--dtype", "float32", "--allow-pickle")
    result = run("check", *args)
    assert result.exit_code == 0, result.output
    refused = run("check", *args[:-1])
    assert refused.exit_code == 2 and "--allow-pickle" in refused.stderr
