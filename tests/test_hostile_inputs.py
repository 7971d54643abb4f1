"""Issue 13: every hostile input ends in exit 2 with one line naming the file, the source untouched, nothing left.

The cases live in tests/hostile_cases.py (bench/reliability_table.py records the same cases in
docs/reliability.md); signals, the umask and file-size limits need a process of their own and are here.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shardproof.cli import app
from tests.helpers import random_checkpoint
from tests.hostile_cases import CASES, REPO, SMALL, convert_slowly, digest, run_case, stagings, wait_staged

@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path]:
    """A clean HF model and its tp=2 checkpoint, never modified (cases copy what they damage)."""
    base = tmp_path_factory.mktemp("sources")
    model = random_checkpoint(base / "hf", "LlamaForCausalLM", seed=0, **SMALL)
    ckpt = base / "trt"
    result = CliRunner().invoke(app, ["convert", "--model_dir", str(model), "--output_dir", str(ckpt), "--tp_size", "2"])
    assert result.exit_code == 0, result.output
    return model, ckpt


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_input(case, sources, tmp_path):
    outcome = run_case(case, tmp_path, *sources)
    assert outcome.exit_code == case.exit_code, outcome.output
    assert outcome.inputs_untouched and not outcome.leftovers, outcome.leftovers
    if case.exit_code == 2:
        assert outcome.clean_failure, outcome.output
        for fragment in case.fragments:
            assert fragment in outcome.first_line, (fragment, outcome.first_line)


def test_sigterm_removes_the_staging_directory(sources, tmp_path):
    model, _ = sources
    out = tmp_path / "out"
    process = convert_slowly(model, out)
    wait_staged(process)
    assert stagings(out)  # the signal arrives while a complete staging directory exists
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == -signal.SIGTERM
    assert not out.exists() and not stagings(out)


def test_stale_staging_of_a_killed_run_is_named_and_removed(sources, tmp_path):
    model, _ = sources
    out = tmp_path / "out"
    process = convert_slowly(model, out)
    wait_staged(process)
    process.kill()  # SIGKILL: no cleanup can run
    process.wait(timeout=30)
    (stale,) = stagings(out)
    result = subprocess.run([sys.executable, "-m", "shardproof", "convert", "--model_dir", str(model), "--output_dir", str(out)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert str(stale) in result.stderr and "did not finish" in result.stderr
    assert not stagings(out) and (out / "rank0.safetensors").exists()


def test_a_running_conversions_staging_is_left_alone(sources, tmp_path):
    model, _ = sources
    out = tmp_path / "out"
    running = convert_slowly(model, out)
    try:
        wait_staged(running)
        (staging,) = stagings(out)
        other = CliRunner().invoke(app, ["convert", "--model_dir", str(model), "--output_dir", str(tmp_path / "out")])
        assert other.exit_code == 0 and staging.exists()
    finally:
        running.kill()
        running.wait(timeout=30)


def test_output_honours_the_umask(sources, tmp_path):
    model, _ = sources
    previous = os.umask(0o022)
    try:
        assert CliRunner().invoke(app, ["convert", "--model_dir", str(model), "--output_dir", str(tmp_path / "out")]).exit_code == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_file_size_limit_is_one_line_and_leaves_nothing(sources, tmp_path):
    model, _ = sources
    out = tmp_path / "out"
    before = digest(model)

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    result = subprocess.run([sys.executable, "-m", "shardproof", "convert", "--model_dir", str(model), "--output_dir", str(out)],
                            capture_output=True, text=True, cwd=REPO, preexec_fn=limit_file_size)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "File too large" in lines[0], result.stderr
    assert not out.exists() and not stagings(out) and digest(model) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_parent(sources, tmp_path):
    model, _ = sources
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = CliRunner().invoke(app, ["convert", "--model_dir", str(model), "--output_dir", str(locked / "out")])
    assert result.exit_code == 2 and "Permission denied" in result.stderr and len(result.stderr.splitlines()) == 1
