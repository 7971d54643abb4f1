"""Outcomes and exit codes of verify and check: 0 every check passed, 1 a check failed, 2 bad input or a bad
option (one line, before any work, nothing written), 3 nothing failed but a requested check could not run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import shardproof.verify.sharded_check as sharded_check
import shardproof.verify.verification as verification
from shardproof.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_NOT_RUN, EXIT_OK, app
from shardproof.converter.api import convert
from shardproof.converter.errors import CheckNotRun
from shardproof.converter.manifest import MANIFEST
from shardproof.verify.forward import MAX_SEQ_LEN
from shardproof.verify.tiny_models import build_tiny_model
from tests.helpers import restamp_manifest

FAST_ARGS = ["--device", "cpu", "--num-sequences", "1", "--seq-len", "16"]
REASSEMBLED = ["reassembly", "config", "weights", "forward", "precision"]


def run(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_bad_input(result, *fragments: str) -> None:
    """Exit 2 with one line of error (after any progress lines) naming what is wrong, and no traceback."""
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert [line.startswith("error:") for line in lines].count(True) == 1 and lines[-1].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """max_position_embeddings 512."""
    return build_tiny_model(tmp_path_factory.mktemp("model"), "LlamaForCausalLM", seed=1, num_hidden_layers=2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "ckpt"
    convert(model, out, dtype="float16", tp_size=2)
    return out


def statuses(report: dict) -> list[tuple[str, str, str]]:
    return [(c["mode"], c["check"], c["status"]) for c in report["checks"]]


def verify(model: Path, ckpt: Path, report: Path, *args) -> tuple[int, dict]:
    result = run("verify", "--model_dir", model, "--checkpoint_dir", ckpt, *FAST_ARGS, "--report", report, *args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(report.read_text())


def test_every_check_passed_exits_0_and_is_listed(model, ckpt, tmp_path):
    code, report = verify(model, ckpt, tmp_path / "r.json")
    assert code == EXIT_OK and report["status"] == "passed" and report["passed"]
    expected = [("manifest", "files", "passed"), ("manifest", "source", "passed")] + [("reassembled", c, "passed") for c in REASSEMBLED]
    assert statuses(report) == expected + [("sharded", "conversion", "passed"), ("sharded", "precision", "passed")]
    assert all(c["reason"] is None for c in report["checks"])
    assert report["reassembled"]["checks"] == report["checks"][2:7]


def test_a_tampered_checkpoint_exits_1_naming_the_failed_check(model, ckpt, tmp_path):
    tampered = tmp_path / "ckpt"
    tampered.mkdir()
    for f in ckpt.iterdir():
        (tampered / f.name).write_bytes(f.read_bytes())
    tensors = load_file(tampered / "rank1.safetensors")
    tensors["transformer.layers.1.mlp.fc.weight"] *= 2
    save_file(tensors, tampered / "rank1.safetensors")
    restamp_manifest(tampered)  # as the faulty converter would have: the checks behind the manifest must see it
    code, report = verify(model, tampered, tmp_path / "r.json")
    assert code == EXIT_FAILED and report["status"] == "failed"
    failed = {(mode, check) for mode, check, status in statuses(report) if status == "failed"}
    assert ("reassembled", "weights") in failed and ("sharded", "conversion") in failed
    weights = next(c for c in report["checks"] if c["check"] == "weights")
    assert weights["reason"] == "1 tensor(s) differ from the source"


def cannot_run(*args, **kwargs):
    raise CheckNotRun("rotary_scaling 'yarn' is not implemented by the sharded runtime")


@pytest.mark.parametrize("mode", ["both", "sharded"])
def test_a_check_that_cannot_run_exits_3_and_the_other_mode_still_runs(model, ckpt, tmp_path, monkeypatch, mode):
    monkeypatch.setattr(sharded_check, "StageRunner", cannot_run)
    code, report = verify(model, ckpt, tmp_path / "r.json", "--mode", mode)
    assert code == EXIT_NOT_RUN and report["status"] == "not run" and not report["passed"] and not report["failures"]
    ran = [("manifest", "files", "passed"), ("manifest", "source", "passed")]
    ran += [("reassembled", c, "passed") for c in REASSEMBLED] if mode == "both" else []
    assert statuses(report) == ran + [("sharded", "conversion", "not run"), ("sharded", "precision", "not run")]
    assert all("yarn" in c["reason"] for c in report["checks"] if c["mode"] == "sharded")
    assert report["sharded"] is None and list(report["not_run"]) == ["sharded"]
    assert (report["reassembled"] is not None) == (mode == "both")


def test_a_failure_outranks_a_check_that_cannot_run(model, tmp_path, monkeypatch):
    other = build_tiny_model(tmp_path / "other", "LlamaForCausalLM", seed=2, num_hidden_layers=2)
    convert(other, tmp_path / "ckpt", dtype="float16", tp_size=2)
    monkeypatch.setattr(sharded_check, "StageRunner", cannot_run)
    code, report = verify(model, tmp_path / "ckpt", tmp_path / "r.json")
    assert code == EXIT_FAILED and report["status"] == "failed"
    assert {c["status"] for c in report["checks"] if c["mode"] == "sharded"} == {"not run"}


def test_check_exits_3_too(model, tmp_path, monkeypatch):
    monkeypatch.setattr(sharded_check, "StageRunner", cannot_run)
    result = run("check", "--model_dir", model, "--dtype", "float16", *FAST_ARGS)
    assert result.exit_code == EXIT_NOT_RUN, result.output
    assert "NOT RUN" in result.stdout


# --- bad input: never a failed check ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["both", "reassembled", "sharded"])
def test_missing_directories_are_bad_input_in_every_mode(model, ckpt, tmp_path, mode):
    absent = tmp_path / "absent"
    assert_bad_input(run("verify", "--mode", mode, "--model_dir", absent, "--checkpoint_dir", ckpt, *FAST_ARGS),
                     str(absent), "model directory not found")
    assert_bad_input(run("verify", "--mode", mode, "--model_dir", model, "--checkpoint_dir", absent, *FAST_ARGS),
                     str(absent), "checkpoint directory not found")
    assert_bad_input(run("check", "--mode", mode, "--model_dir", absent, *FAST_ARGS), str(absent))


@pytest.mark.parametrize("mode", ["both", "reassembled", "sharded"])
def test_unreadable_config_json_is_bad_input(model, ckpt, tmp_path, mode):
    broken_ckpt, broken_model = tmp_path / "ckpt", tmp_path / "model"
    for src, dst in ((ckpt, broken_ckpt), (model, broken_model)):
        dst.mkdir()
        for f in src.iterdir():
            if f.name != MANIFEST:  # with its manifest, a changed config.json is a failed check (test_manifest.py)
                (dst / f.name).write_bytes(f.read_bytes())
        (dst / "config.json").write_text("{not json")
    assert_bad_input(run("verify", "--mode", mode, "--model_dir", model, "--checkpoint_dir", broken_ckpt, *FAST_ARGS),
                     str(broken_ckpt / "config.json"), "JSON")
    assert_bad_input(run("verify", "--mode", mode, "--model_dir", broken_model, "--checkpoint_dir", ckpt, *FAST_ARGS),
                     str(broken_model / "config.json"), "JSON")


def test_a_model_transformers_cannot_load_is_bad_input(model, ckpt, tmp_path):
    broken = tmp_path / "model"
    broken.mkdir()
    for f in model.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # headers intact, the last tensor's data cut short
    for mode in ("reassembled", "sharded"):
        assert_bad_input(run("verify", "--mode", mode, "--model_dir", broken, "--checkpoint_dir", ckpt, *FAST_ARGS),
                         str(broken))


# --- options are checked before any work -----------------------------------------------------------------------

def no_work(*args, **kwargs):
    raise AssertionError("work started before the options were checked")


@pytest.mark.parametrize("option, fragment", [
    (["--seed", str(10**30)], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--seq-len", str(10**9)], "--seq-len"),
    (["--seq-len", "0"], "--seq-len"),
    (["--seq-len", str(MAX_SEQ_LEN + 1)], "--seq-len"),
    (["--num-sequences", str(10**6)], "--num-sequences"),
    (["--num-sequences", "0"], "--num-sequences"),
    (["--device", "tpu"], "--device"),
    (["--mode", "fast"], "--mode"),
    (["--report", "DIR"], "is a directory"),
    (["--report", "DIR/absent/r.json"], "does not exist"),
])
@pytest.mark.parametrize("command", ["verify", "check"])
def test_bad_options_exit_2_before_any_work_writing_nothing(model, ckpt, tmp_path, monkeypatch, command, option, fragment):
    monkeypatch.setattr(verification, "verify_checkpoint", no_work)
    monkeypatch.setattr(verification, "convert_and_check", no_work)
    out = tmp_path / "out"
    option = [o.replace("DIR", str(tmp_path)) for o in option]
    inputs = ["--checkpoint_dir", ckpt] if command == "verify" else ["--output_dir", out]
    assert_bad_input(run(command, "--model_dir", model, *inputs, *option), option[0])
    assert fragment in run(command, "--model_dir", model, *inputs, *option).stderr
    assert sorted(tmp_path.iterdir()) == []


def test_seq_len_beyond_the_models_positions_is_bad_input(model, ckpt, tmp_path):
    report = tmp_path / "r.json"
    for args in (["verify", "--checkpoint_dir", ckpt], ["check", "--output_dir", tmp_path / "out"]):
        result = run(*args, "--model_dir", model, "--device", "cpu", "--seq-len", "513", "--report", report)
        assert_bad_input(result, "--seq-len 513", "max_position_embeddings=512")
    assert sorted(tmp_path.iterdir()) == []
