"""Issue 13 item 10: the integrity manifest beside the rank files, written with the checkpoint and checked first by
inspect, reassemble and verify; a checkpoint without one is accepted and noted."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shardproof.cli import app
from shardproof.converter.api import convert
from shardproof.converter.digests import file_digest
from shardproof.converter.manifest import MANIFEST, Manifest, check_manifest, source_differences, source_fingerprint
from shardproof.converter.source import open_source
from tests.helpers import random_checkpoint
from tests.hostile_cases import SMALL

FAST = ["--device", "cpu", "--num_sequences", "1", "--seq_len", "8"]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("hf") / "m", "LlamaForCausalLM", seed=0, **SMALL)


@pytest.fixture(scope="module")
def clean(tmp_path_factory, model) -> Path:
    out = tmp_path_factory.mktemp("trt") / "ckpt"
    convert(model, out, dtype="float16", tp_size=2)
    return out


@pytest.fixture()
def ckpt(clean, tmp_path) -> Path:
    return Path(shutil.copytree(clean, tmp_path / "ckpt"))


def test_manifest_holds_every_written_file_and_the_source(clean, model):
    manifest = Manifest.read(clean / MANIFEST)
    assert sorted(manifest.files) == ["config.json", "rank0.safetensors", "rank1.safetensors"]
    assert all(file_digest(clean / name) == digest for name, digest in manifest.files.items())  # streamed = re-read
    assert {d.scheme for d in manifest.files.values()} == {"safetensors-blake3", "blake3"}
    assert manifest.source == source_fingerprint(open_source(model)) and set(manifest.source) == {"config.json", "model.safetensors"}
    assert manifest.tool_version == importlib.metadata.version("shardproof")


def flip_last_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x40
    path.write_bytes(bytes(raw))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-64])


def break_header(path: Path) -> None:
    """The header's JSON no longer parses: the per-tensor digest cannot even split the file."""
    raw = bytearray(path.read_bytes())
    raw[8] = ord("[")
    path.write_bytes(bytes(raw))


def swap_header_spaces(path: Path) -> None:
    """A byte of the header's padding changed: the header still parses, and only its own digest sees it."""
    raw = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    raw[header_end - 1 : header_end] = b"\t" if raw[header_end - 1 : header_end] == b" " else b" "
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, problem", [(flip_last_byte, "corrupted"), (truncate, "truncated"),
                                             (break_header, "corrupted"), (swap_header_spaces, "corrupted")])
@pytest.mark.parametrize("verb", ["inspect", "reassemble", "verify:both", "verify:reassembled", "verify:sharded"])
def test_a_damaged_rank_file_is_named_first_and_exits_1(ckpt, model, tmp_path, damage, problem, verb):
    damage(ckpt / "rank1.safetensors")
    if verb == "inspect":
        result = cli("inspect", ckpt)
    elif verb == "reassemble":
        result = cli("reassemble", ckpt, tmp_path / "back")
        assert not (tmp_path / "back").exists()
    else:
        report = tmp_path / "r.json"
        result = cli("verify", "--model_dir", model, "--checkpoint_dir", ckpt, "--mode", verb.split(":")[1], *FAST, "--report", report)
        checks = json.loads(report.read_text())["checks"]
        assert checks[0]["check"] == "files" and checks[0]["status"] == "failed" and "rank1.safetensors" in checks[0]["reason"]
        assert {c["status"] for c in checks[1:]} == {"not run"}  # whatever the modes read of it is dropped
    assert result.exit_code == 1, result.output
    assert "rank1.safetensors" in result.output and problem in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("format", [1, 2])
def test_an_older_manifest_hashing_with_sha256_is_still_checked(ckpt, model, format):
    """Checkpoints written before per-tensor digests (format 1: each file's SHA-256, whole) and before BLAKE3
    (format 2: SHA-256 per tensor for safetensors files) are checked with their own schemes."""
    manifest = Manifest.read(ckpt / MANIFEST)

    def scheme(name: str) -> str:
        return "safetensors-sha256" if format == 2 and name.endswith(".safetensors") else "sha256"

    def stored(digests: dict) -> dict:
        return {n: {"sha256": d.digest, "size": d.size, **({"scheme": d.scheme} if format == 2 else {})}
                for n, d in digests.items()}

    files = {name: file_digest(ckpt / name, scheme(name)) for name in manifest.files}
    source = {name: file_digest(model / name, scheme(name)) for name in manifest.source}
    assert {d.scheme for d in files.values()} == {scheme("x.safetensors"), "sha256"}
    assert all(files[n].digest != d.digest for n, d in manifest.files.items())
    data = {"format": format, "tool_version": "0.1.0", "source": stored(source), "files": stored(files)}
    (ckpt / MANIFEST).write_text(json.dumps(data))
    assert cli("inspect", ckpt).exit_code == 0
    assert check_manifest(ckpt).passed and source_differences(Manifest.read(ckpt / MANIFEST), model) == []
    flip_last_byte(ckpt / "rank0.safetensors")
    assert check_manifest(ckpt).problems == {
        "rank0.safetensors": f"corrupted: its {scheme('x.safetensors')} digest differs from the manifest's"}


def test_a_changed_config_json_is_named(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "rotary_base": 10000.0}))
    result = cli("inspect", ckpt)
    assert result.exit_code == 1 and "config.json" in result.output and "the manifest says" in result.output


def test_without_a_manifest_every_command_still_works_and_says_so(ckpt, model, tmp_path):
    (ckpt / MANIFEST).unlink()
    for result in (cli("inspect", ckpt), cli("reassemble", ckpt, tmp_path / "back"),
                   cli("verify", "--model_dir", model, "--checkpoint_dir", ckpt, *FAST)):
        assert result.exit_code == 0, result.output
        assert f"no {MANIFEST}" in result.output


def test_a_manifest_is_ignored_by_readers_of_config_and_rank_files(clean, tmp_path):
    result = cli("inspect", clean)
    assert result.exit_code == 0 and "3 file(s) match" in result.output
    assert cli("reassemble", clean, tmp_path / "back").exit_code == 0


def test_verify_against_another_source_fails_the_source_check_and_still_compares_weights(clean, model, tmp_path):
    same_weights = Path(shutil.copytree(model, tmp_path / "resaved"))
    config = json.loads((same_weights / "config.json").read_text())
    (same_weights / "config.json").write_text(json.dumps(config, indent=4))  # the same model, saved again
    report = tmp_path / "r.json"
    result = cli("verify", "--model_dir", same_weights, "--checkpoint_dir", clean, *FAST, "--report", report)
    assert result.exit_code == 1, result.output
    checks = {(c["mode"], c["check"]): c for c in json.loads(report.read_text())["checks"]}
    assert checks["manifest", "source"]["status"] == "failed" and "config.json" in checks["manifest", "source"]["reason"]
    assert checks["reassembled", "weights"]["status"] == "passed"  # weights are compared anyway
    other = random_checkpoint(tmp_path / "other", "LlamaForCausalLM", seed=1, **SMALL)
    result = cli("verify", "--model_dir", other, "--checkpoint_dir", clean, *FAST, "--report", report)
    checks = {(c["mode"], c["check"]): c for c in json.loads(report.read_text())["checks"]}
    assert result.exit_code == 1 and checks["manifest", "source"]["status"] == "failed"
    assert checks["reassembled", "weights"]["status"] == "failed"


@pytest.mark.parametrize("content, fragment", [
    (b"{not json", "not valid JSON"),
    (json.dumps({"format": 1, "tool_version": "x", "source": {}, "files": {"../rank0.safetensors": {"sha256": "0" * 64, "size": 1}}}).encode(),
     "not a file of the checkpoint directory"),
    (json.dumps({"format": 1, "tool_version": "x", "source": {}, "files": {"rank0.safetensors": {"sha256": "zz", "size": -1}}}).encode(),
     "not a digest ('sha256', 64 hex digits), a size"),
    (json.dumps({"format": 2, "tool_version": "x", "source": {}, "files": {"rank0.safetensors": {"sha256": "0" * 64, "size": 1, "scheme": "safetensors-blake3"}}}).encode(),
     "and a scheme (sha256, safetensors-sha256)"),
    (json.dumps({"format": 3, "tool_version": "x", "source": {}, "files": {"rank0.safetensors": {"sha256": "0" * 64, "size": 1, "scheme": "blake3"}}}).encode(),
     "not a digest ('digest', 64 hex digits)"),
    (json.dumps({"format": 4}).encode(), "format 4"),
])
def test_a_malformed_manifest_is_one_line(ckpt, content, fragment):
    (ckpt / MANIFEST).write_bytes(content)
    result = cli("inspect", ckpt)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and MANIFEST in lines[0] and fragment in lines[0], result.output


def test_convert_hashes_what_it_reads_and_writes_without_a_second_pass(model, tmp_path, monkeypatch):
    """Every tensor's digest comes from the bytes the conversion read or wrote: afterwards only the safetensors
    headers and the JSON files are read again for the manifest."""
    import shardproof.converter.digests as digests

    reread, original = [], digests._range_digest
    monkeypatch.setattr(digests, "_range_digest", lambda path, start, length, scheme: reread.append((Path(path).name, start))
                        or original(path, start, length, scheme))
    convert(model, tmp_path / "ckpt", dtype="float16", tp_size=2, workers=2)
    assert sorted(reread) == [("config.json", 0), ("config.json", 0), ("model.safetensors", 0)]
    manifest = Manifest.read(tmp_path / "ckpt" / MANIFEST)
    assert manifest.source == source_fingerprint(open_source(model))
    assert all(file_digest(tmp_path / "ckpt" / name) == digest for name, digest in manifest.files.items())


def test_only_a_conversion_hashes_the_tensors_it_reads(clean, model, monkeypatch):
    """Verification reads the source and the rebuilt model several times and needs no digest of what it reads
    (the manifest check hashes the files itself): its tensor reads take none."""
    import shardproof.converter.safetensors_io as safetensors_io
    from shardproof.verify.forward import BatchOptions
    from shardproof.verify.verification import verify_checkpoint

    hashed: list[int] = []
    original = safetensors_io.part_digest
    monkeypatch.setattr(safetensors_io, "part_digest", lambda data: hashed.append(len(data)) or original(data))
    assert verify_checkpoint(model, clean, "both", BatchOptions("cpu", 1, 8)).passed
    assert hashed == []
