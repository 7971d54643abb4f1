"""The command line: TensorRT-LLM flag spellings, exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tests.helpers import random_checkpoint, restamp_manifest
from shardproof.cli import app

SMALL = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=4, hidden_size=16, intermediate_size=16,
             num_hidden_layers=2, vocab_size=19)


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture()
def model(tmp_path) -> Path:
    return random_checkpoint(tmp_path / "hf", "LlamaForCausalLM", seed=0, **SMALL)


def assert_clean_failure(result, *fragments: str) -> None:
    """Exit 2, exactly one line of error naming what is wrong, and no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("spelling", ["underscore", "dash"])
def test_convert_accepts_trtllm_spellings_then_reassembles_and_inspects(model, tmp_path, spelling):
    flag = (lambda f: f) if spelling == "underscore" else (lambda f: f.replace("_", "-"))
    out = tmp_path / "trt"
    result = run("convert", flag("--model_dir"), model, flag("--output_dir"), out, "--dtype", "float16",
                 flag("--tp_size"), 2, flag("--pp_size"), 2)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json"] + [f"rank{r}.safetensors" for r in range(4)] + ["shardproof-manifest.json"]
    inspected = run("inspect", out)
    assert inspected.exit_code == 0 and "rank3.safetensors" in inspected.output
    back = run("reassemble", out, tmp_path / "back")
    assert back.exit_code == 0, back.output
    assert (tmp_path / "back" / "model.safetensors").exists()


def test_dry_run_plans_from_headers_without_reading_data(model, tmp_path, monkeypatch):
    from shardproof.converter.safetensors_io import TensorReader

    def no_data_reads(self, name):
        raise AssertionError(f"dry run read tensor data of {name}")

    monkeypatch.setattr(TensorReader, "read", no_data_reads)
    result = run("convert", "--model_dir", model, "--tp_size", 2, "--pp_size", 2, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "tp=2 pp=2" in result.output
    monkeypatch.undo()
    weights = model / "model.safetensors"
    raw = weights.read_bytes()
    (header_length,) = struct.unpack("<Q", raw[:8])
    weights.write_bytes(raw[: 8 + header_length])  # headers intact, every byte of tensor data gone
    out = tmp_path / "trt"
    for args in (["--dry-run"], ["--output_dir", out]):  # judged from the header, the same way with or without data reads
        assert_clean_failure(run("convert", "--model_dir", model, *args), str(weights), "the file holds 0")
    assert not out.exists() and not list(tmp_path.glob(".trt*"))


def test_missing_model_dir_and_config(tmp_path):
    assert_clean_failure(run("convert", "--model_dir", tmp_path / "nope", "--output_dir", tmp_path / "o"), "not found")
    (tmp_path / "empty").mkdir()
    assert_clean_failure(run("convert", "--model_dir", tmp_path / "empty", "--output_dir", tmp_path / "o"), "holds no checkpoint in a registered format")


def test_unsupported_architecture(model, tmp_path):
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["GPTJForCausalLM"]
    (model / "config.json").write_text(json.dumps(cfg))
    assert_clean_failure(run("convert", "--model_dir", model, "--output_dir", tmp_path / "o"), "GPTJForCausalLM")


def test_unmapped_missing_and_misshapen_tensors_fail_closed(model, tmp_path):
    weights = model / "model.safetensors"
    tensors = load_file(weights)
    extra = {**tensors, "model.layers.0.mlp.extra.weight": tensors["model.norm.weight"].clone()}
    save_file(extra, weights)
    assert_clean_failure(run("convert", "--model_dir", model, "--output_dir", tmp_path / "o"), "model.layers.0.mlp.extra.weight", "not mapped")
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.k_proj.weight"}, weights)
    assert_clean_failure(run("convert", "--model_dir", model, "--output_dir", tmp_path / "o"), "model.layers.1.self_attn.k_proj.weight", "missing")
    save_file({**tensors, "model.norm.weight": tensors["model.norm.weight"][:-1].clone()}, weights)
    assert_clean_failure(run("convert", "--model_dir", model, "--output_dir", tmp_path / "o"), "model.norm.weight", "shape")
    assert not (tmp_path / "o").exists()


def test_indivisible_heads_name_the_numbers(model, tmp_path):
    assert_clean_failure(run("convert", "--model_dir", model, "--output_dir", tmp_path / "o", "--tp_size", 3),
                         "num_attention_heads=4", "tp_size=3")
    assert_clean_failure(run("convert", "--model_dir", model, "--output_dir", tmp_path / "o", "--pp_size", 3),
                         "pp_size=3", "num_hidden_layers=2")


def test_bad_dtype_and_existing_output(model, tmp_path):
    assert_clean_failure(run("convert", "--model_dir", model, "--output_dir", tmp_path / "o", "--dtype", "int4"), "int4")
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_clean_failure(run("convert", "--model_dir", model, "--output_dir", out), "already exists")
    assert (out / "keep.txt").read_text() == "mine"
    assert run("convert", "--model_dir", model, "--output_dir", out, "--overwrite").exit_code == 0
    assert not (out / "keep.txt").exists()


def test_usage_errors_exit_2(model):
    assert run("convert", "--no-such-flag").exit_code == 2
    assert run("frobnicate").exit_code == 2


def test_broken_checkpoint_exits_1_naming_rank_and_tensor(model, tmp_path):
    out = tmp_path / "trt"
    assert run("convert", "--model_dir", model, "--output_dir", out, "--tp_size", 2).exit_code == 0
    rank1 = out / "rank1.safetensors"
    tensors = load_file(rank1)
    del tensors["transformer.layers.1.mlp.gate.weight"]
    save_file(tensors, rank1)
    for result in (run("inspect", out), run("reassemble", out, tmp_path / "back")):  # the manifest names the file first
        assert result.exit_code == 1 and "rank1.safetensors" in result.output and "the manifest says" in result.output, result.output
    restamp_manifest(out)  # as a converter that wrote the faulty file would have
    for result in (run("inspect", out), run("reassemble", out, tmp_path / "back")):
        assert result.exit_code == 1, result.output
        assert "transformer.layers.1.mlp.gate.weight" in result.output and "missing" in result.output
    assert not (tmp_path / "back").exists()


def test_bad_checkpoint_config_is_bad_input(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    assert_clean_failure(run("inspect", tmp_path / "ckpt"), "config.json", "JSON")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"architecture": "LlamaForCausalLM"}))
    assert_clean_failure(run("reassemble", tmp_path / "ckpt", tmp_path / "back"), "config.json", "missing field")


@pytest.mark.parametrize("quiet", [False, True])
def test_convert_progress_shows_bytes_and_rate_unless_quiet(model, tmp_path, monkeypatch, quiet):
    import io

    from rich.console import Console

    from shardproof import cli

    screen = io.StringIO()
    monkeypatch.setattr(cli, "err_console", Console(file=screen, force_terminal=True, width=120))
    result = run("convert", "--model_dir", model, "--output_dir", tmp_path / "trt", "--tp_size", 2, "--workers", 2,
                 *(["--quiet"] if quiet else []))
    assert result.exit_code == 0, result.output
    shown = screen.getvalue()
    assert ("converting" in shown and "/s" in shown and "KiB" in shown) != quiet, shown


def test_workers_must_be_positive(model, tmp_path):
    assert_clean_failure(run("convert", "--model_dir", model, "--output_dir", tmp_path / "o", "--workers", 0), "--workers 0")
    assert not (tmp_path / "o").exists()


def test_check_passes_workers_to_the_conversion(model, tmp_path):
    result = run("check", "--model_dir", model, "--output_dir", tmp_path / "o", "--workers", 0, "--device", "cpu")
    assert result.exit_code == 2 and "--workers 0: must be at least 1" in result.stderr, result.output
    assert not (tmp_path / "o").exists()
