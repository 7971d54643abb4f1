"""Verification streams the models one layer at a time: a cap on resident parameters at a quarter of the model
holds in both modes, a cap below one layer makes the checks not run (never fail), and the peak RSS of a verify
process grows far less than the model when its depth doubles (deterministic: sizes, not times)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from shardproof.cli import EXIT_NOT_RUN, EXIT_OK, app
from shardproof.converter.api import convert
from shardproof.converter.source import open_source
from shardproof.verify.forward import BatchOptions
from shardproof.verify.outcomes import Status
from shardproof.verify.tiny_models import build_tiny_model
from shardproof.verify.verification import verify_checkpoint

GIB = 2**30
BATCH = dict(device="cpu", num_sequences=1, seq_len=16)


def _model_bytes(model_dir: Path) -> int:
    source = open_source(model_dir)
    return sum(source.nbytes(name) for name in source.shapes)


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> tuple[Path, Path]:
    """Eight float32 layers, converted to bfloat16 over tp 2 and pp 2."""
    tmp = tmp_path_factory.mktemp("deep")
    model = build_tiny_model(tmp / "model", "LlamaForCausalLM", seed=2, num_hidden_layers=8, vocab_size=64)
    convert(model, tmp / "ckpt", dtype="bfloat16", tp_size=2, pp_size=2)
    return model, tmp / "ckpt"


@pytest.mark.parametrize("fraction, reads", [(4, 1), (6, 4)], ids=["quarter", "sixth"])
def test_a_quarter_of_the_model_is_enough_to_verify_it(deep, fraction, reads) -> None:
    """Under a quarter of the model (two layers), both modes' runs share each read of a layer; under a sixth,
    which holds one layer but not a stored one beside a loaded one, they run one after another."""
    model, ckpt = deep
    batch = BatchOptions(**BATCH, max_device_memory=_model_bytes(model) / fraction / GIB)
    progress: list[int] = []
    result = verify_checkpoint(model, ckpt, "both", batch, progress=progress.append)
    assert result.status is Status.PASSED, result.failures
    # In lock step the float32 source is read once for both modes: the weights comparison and every run (the
    # sharded mode's teacher-forced run over stored values, the original, the model loaded in bfloat16 for its own
    # cost, which is also the reassembled mode's expected run, and the rebuilt model beside them). One after
    # another: the weights comparison, then each of the three runs the modes share (the rebuilt model reads the
    # rank files, which are not counted).
    assert sum(progress) == reads * _model_bytes(model)


def test_a_cap_below_one_layer_is_not_run(deep) -> None:
    model, ckpt = deep
    cap = f"{_model_bytes(model) / 64 / GIB:.9f}"
    result = CliRunner().invoke(app, ["verify", "--model_dir", str(model), "--checkpoint_dir", str(ckpt),
                                      "--device", "cpu", "--num-sequences", "1", "--seq-len", "16",
                                      "--max-device-memory", cap])
    assert result.exit_code == EXIT_NOT_RUN, result.output
    assert "above the cap" in result.output


def test_a_device_out_of_memory_is_not_run_not_failed(deep, monkeypatch) -> None:
    """A mode the device has too little memory for could not run: exit 3, never a failure or a traceback."""
    import shardproof.verify.verification as verification

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.96 GiB.")

    monkeypatch.setattr(verification, "sharded_check", out_of_memory)
    model, ckpt = deep
    result = CliRunner().invoke(app, ["verify", "--model_dir", str(model), "--checkpoint_dir", str(ckpt),
                                      "--mode", "sharded", "--device", "cpu", "--num-sequences", "1", "--seq-len", "16"])
    assert result.exit_code == EXIT_NOT_RUN, result.output
    assert "ran out of memory" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_bad_cap_is_bad_input(deep, value) -> None:
    model, ckpt = deep
    result = CliRunner().invoke(app, ["verify", "--model_dir", str(model), "--checkpoint_dir", str(ckpt),
                                      "--device", "cpu", "--max-device-memory", value])
    assert result.exit_code == 2 and "--max-device-memory" in result.output


VERIFY = textwrap.dedent("""
    import sys
    from shardproof.verify.forward import BatchOptions
    from shardproof.verify.verification import verify_checkpoint
    print(verify_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], BatchOptions("cpu", 1, 16)).status.value)
""")
# ru_maxrss survives fork and exec: the verify runs as the child of a bare interpreter (no torch), which reports it
PEAK_RSS = textwrap.dedent("""
    import json, os, subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", *sys.argv[1:]], stdout=subprocess.PIPE, text=True)
    status = child.stdout.read().strip().splitlines()[-1]
    _, code, usage = os.wait4(child.pid, 0)
    print(json.dumps({"status": status, "code": code, "peak_rss": usage.ru_maxrss * 1024}))
""")


@pytest.mark.parametrize("mode", ["reassembled", "sharded"])
def test_peak_rss_stays_flat_when_the_depth_doubles(tmp_path, mode) -> None:
    """4 and 16 layers of 16 MiB (float32): the model grows by 192 MiB; a verify that held it whole would grow by
    at least as much; streamed, the peak grows by the activations and bookkeeping alone."""
    sizes = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=8, vocab_size=64)
    peaks, grown = [], []
    for layers in (4, 16):
        model = build_tiny_model(tmp_path / f"m{layers}", "LlamaForCausalLM", seed=0, num_hidden_layers=layers, **sizes)
        convert(model, tmp_path / f"c{layers}", dtype="float32", tp_size=2)
        run = subprocess.run([sys.executable, "-c", PEAK_RSS, VERIFY, str(model), str(tmp_path / f"c{layers}"), mode],
                             capture_output=True, text=True, check=True)
        out = json.loads(run.stdout.strip().splitlines()[-1])
        assert out["status"] == "passed"
        peaks.append(out["peak_rss"])
        grown.append(_model_bytes(model))
    assert grown[1] - grown[0] >= 190 * 2**20
    assert peaks[1] - peaks[0] < (grown[1] - grown[0]) / 4, (peaks, grown)
