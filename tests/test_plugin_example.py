"""The example plugin (examples/plugin), installed as a separate package: its architecture (OLMo2) and weight
format (`npy`) are listed, convert, reassemble, verify and pass the gate, with no change to shardproof.

Every run is a fresh `shardproof` process, which discovers the plugin through its entry point as any user's would.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from shardproof.converter.card import TestSupport as CardTests
from shardproof.verify.tiny_models import TINY, randomize_
from tests.helpers import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "examples" / "plugin"
ARCH = "Olmo2ForCausalLM"
ORIGIN = "plugin shardproof-olmo2 0.1.0"


@pytest.fixture(scope="session", autouse=True)
def plugin_installed() -> None:
    """Install the example plugin into this environment when it is not (CI's .ci/run installs it first); new
    processes find it through its entry point, this one through its source folder."""
    try:
        importlib.metadata.distribution("shardproof-olmo2")
    except importlib.metadata.PackageNotFoundError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "-e",
                        str(PLUGIN)], check=True)
    if importlib.util.find_spec("shardproof_olmo2") is None:  # an install made after this interpreter started
        sys.path.append(str(PLUGIN / "src"))


def shardproof(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardproof", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def olmo2(tmp_path_factory) -> Path:
    """A tiny random OLMo2 (biases on), saved by transformers as safetensors."""
    config = transformers.Olmo2Config(**TINY, attention_bias=True, pad_token_id=None, eos_token_id=None)
    config.architectures = [ARCH]
    torch.manual_seed(0)
    model = transformers.Olmo2ForCausalLM(config)
    randomize_(model, 0, CardTests(config_class="Olmo2Config", strategy=lambda: None))
    directory = tmp_path_factory.mktemp("olmo2") / "hf"
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def olmo2_npy(olmo2, tmp_path_factory) -> Path:
    """The same model in the plugin's `npy` format (its own writer)."""
    from shardproof_olmo2.npy_format import save_npy_checkpoint

    return save_npy_checkpoint(load_checkpoint(olmo2), olmo2 / "config.json", tmp_path_factory.mktemp("npy") / "m")


def test_list_shows_the_plugin_components_and_their_origin() -> None:
    run = shardproof("list", "--json")
    assert run.returncode == 0, run.stderr
    components = {(c["kind"], c["name"]): c for c in json.loads(run.stdout)}
    for key in [("architecture", ARCH), ("checkpoint format", "hf-npy"), ("weight loader", "npy")]:
        assert components[key]["origin"] == ORIGIN, components.get(key)
    assert components[("checkpoint format", "hf-npy")]["details"] == {"config loader": "hf", "weight loader": "npy"}
    table = shardproof("list")
    assert table.returncode == 0 and ARCH in table.stdout and "hf-npy" in table.stdout


def test_npy_source_converts_to_the_rank_files_of_its_safetensors_copy(olmo2, olmo2_npy, tmp_path) -> None:
    layout = ("--tp_size", "2", "--pp_size", "2", "--dtype", "bfloat16")
    for source, out in ((olmo2, "a"), (olmo2_npy, "b")):
        run = shardproof("convert", "--model_dir", source, "--output_dir", tmp_path / out, *layout)
        assert run.returncode == 0, run.stderr
    for name in ["config.json", *(f"rank{r}.safetensors" for r in range(4))]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    manifest = json.loads((tmp_path / "b" / "shardproof-manifest.json").read_text())
    assert set(manifest["source"]) == {p.name for p in olmo2_npy.iterdir()}
    assert f"as hf-npy ({len(manifest['source'])} file(s))" in run.stdout


def test_npy_olmo2_reassembles_to_its_tensors_and_verifies(olmo2_npy, tmp_path) -> None:
    """tp 4 over 2 KV heads: each KV head, and its part of the k_norm statistic, lives on two ranks."""
    checkpoint = tmp_path / "trt"
    run = shardproof("convert", "--model_dir", olmo2_npy, "--output_dir", checkpoint, "--tp_size", "4", "--pp_size", "1",
                     "--dtype", "float32", "--use_parallel_embedding")
    assert run.returncode == 0, run.stderr
    back = shardproof("reassemble", checkpoint, tmp_path / "back")
    assert back.returncode == 0, back.stdout + back.stderr
    rebuilt = load_checkpoint(tmp_path / "back")
    from shardproof_olmo2.npy_format import NpyWeights

    source = NpyWeights(olmo2_npy)
    assert rebuilt.keys() == source.tensors.keys()
    assert all(torch.equal(rebuilt[name], source.load(name)) for name in rebuilt)
    verified = shardproof("verify", "--model_dir", olmo2_npy, "--checkpoint_dir", checkpoint, "--device", "cpu",
                          "--num_sequences", "1", "--seq_len", "64")
    assert verified.returncode == 0, verified.stdout[-3000:] + verified.stderr
    assert "PASS" in verified.stdout


def test_a_changed_npy_file_fails_the_manifest_check(olmo2_npy, tmp_path) -> None:
    checkpoint = tmp_path / "trt"
    assert shardproof("convert", "--model_dir", olmo2_npy, "--output_dir", checkpoint).returncode == 0
    changed = tmp_path / "changed"
    changed.mkdir()
    for path in olmo2_npy.iterdir():
        (changed / path.name).write_bytes(path.read_bytes())
    index = json.loads((changed / "weights.json").read_text())["tensors"]
    file = changed / index["model.norm.weight"]["file"]
    np.save(file, np.load(file) * 2)
    run = shardproof("verify", "--model_dir", changed, "--checkpoint_dir", checkpoint, "--device", "cpu",
                     "--num_sequences", "1", "--seq_len", "16")
    assert run.returncode == 1 and file.name in run.stdout, run.stdout[-2000:]


def test_an_npy_index_naming_a_missing_file_is_one_line_of_bad_input(olmo2_npy, tmp_path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in olmo2_npy.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    index = json.loads((broken / "weights.json").read_text())
    (broken / index["tensors"]["model.norm.weight"]["file"]).unlink()
    run = shardproof("convert", "--model_dir", broken, "--output_dir", tmp_path / "out")
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1 and "weights.json" in lines[0] and "model.norm.weight" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_the_gate_runs_every_check_on_the_plugin_architecture(tmp_path) -> None:
    """Coverage, properties, golden (against the manifests the plugin ships), verify and the self-test."""
    run = shardproof("gate", ARCH, "--junit-xml", tmp_path / "gate.xml")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr
    assert f"| {ARCH} | trtllm-checkpoint | " + " | ".join(["✅ passed"] * 5) + " |" in run.stdout
    assert "trtllm-pytorch" not in run.stdout  # the card declares no PyTorch-backend rows: gated in its one target
    assert "4 case(s) match their manifests" in run.stdout
