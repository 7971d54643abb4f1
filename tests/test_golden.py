"""The golden suite: `golden check` passes on the committed manifests of every target each card supports, and a
changed mapper rule of one target fails it in that target alone, naming the tensors it moved."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from typer.testing import CliRunner

import shardproof.cli as cli
from shardproof.converter import card as registry
from shardproof.converter.card import Row, get_card
from shardproof.converter.plan import DEFAULT_TARGET
from shardproof.converter.target import PYTORCH, targets, targets_for
from shardproof.converter.transforms import COLUMN, ROW, VOCAB, CeilSplit
from shardproof.golden import suite
from shardproof.golden.cases import cases_for
from shardproof.golden.manifest import Manifest
from shardproof.golden.source_model import draw
from shardproof.converter.registry import Entry

ARCH = "LlamaForCausalLM"
SHARED_NORMS = "GemmaForCausalLM"  # the card whose norms carry a source op


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Tables wide enough that tensor names are not folded across lines."""
    monkeypatch.setattr(cli.console, "width", 400)


def run(*args: str):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def with_card(monkeypatch, architecture: str, **changes) -> None:
    """Register `architecture`'s card with `changes` (dataclass fields), for this test only."""
    card = dataclasses.replace(get_card(architecture), **changes)
    monkeypatch.setitem(registry.CARDS.by_name, architecture, Entry(architecture, card, __name__))


def with_rows(monkeypatch, architecture: str, edit: Callable[[Row], Row], target: str = DEFAULT_TARGET) -> None:
    """Register `architecture`'s card with `edit` applied to every row of `target`, for this test only."""
    card = get_card(architecture)
    if target == DEFAULT_TARGET:
        with_card(monkeypatch, architecture, rows=tuple(map(edit, card.rows)))
    else:
        held = card.targets[target]
        edited = dataclasses.replace(held, rows=tuple(map(edit, held.rows)))
        with_card(monkeypatch, architecture, targets={**card.targets, target: edited})


def every_case() -> list:
    return [case for card in registry.cards() for t in targets_for(card) for case in cases_for(card.name, t.name)]


def test_golden_check_passes_on_the_committed_manifests_of_every_target() -> None:
    result = run("golden", "check")
    assert result.exit_code == 0, result.output
    cases = every_case()
    assert {case.target for case in cases} == {t.name for t in targets()}  # some card supports each target
    assert result.output.count("│ same ") == len(cases) and "golden check failed" not in result.output


def test_every_registered_card_has_a_manifest_per_case_and_target() -> None:
    expected = {suite.manifest_path(case) for case in every_case()}
    bases = {suite.MANIFESTS} | {suite.manifest_dir_for(card.name) for card in registry.cards()}
    directories = {suite.target_dir(base, t.name) for base in bases for t in targets()}
    assert expected == {path for directory in directories for path in directory.glob("*.json")}
    assert suite.MANIFESTS / PYTORCH.name / f"{ARCH}-tp1-pp1-float32.json" in expected


def test_a_case_the_target_refuses_has_no_golden_there() -> None:
    for card in registry.cards():
        if PYTORCH.supports(card):
            refuses_ties = any("tie_word_embeddings" in c for c, _ in PYTORCH.rows(card).refused)
            labels = {case.label for case in cases_for(card.name, PYTORCH.name)}
            assert ("tp2-float32-tied" in labels) == (not refuses_ties) and len(labels) >= 3, card.name


@pytest.mark.parametrize("target, edit, moved, untouched", [
    # the checkpoint's mlp.fc and mlp.gate written under each other's names
    (DEFAULT_TARGET, lambda row: dataclasses.replace(row, target={
        "transformer.layers.{i}.mlp.fc.weight": "transformer.layers.{i}.mlp.gate.weight",
        "transformer.layers.{i}.mlp.gate.weight": "transformer.layers.{i}.mlp.fc.weight"}.get(row.target, row.target)),
     ("transformer.layers.0.mlp.fc.weight", "transformer.layers.2.mlp.gate.weight"), "attention.qkv.weight"),
    # the backend's fused gate_up_proj written [up_r; gate_r]: same names and shapes, other bytes
    (PYTORCH.name, lambda row: dataclasses.replace(row, sources=row.sources[::-1])
     if row.target.endswith("mlp.gate_up_proj.weight") else row,
     ("model.layers.0.mlp.gate_up_proj.weight", "model.layers.2.mlp.gate_up_proj.weight"), "qkv_proj.weight"),
])
def test_swapped_tensors_fail_their_target_alone_naming_them(monkeypatch, target, edit, moved, untouched) -> None:
    with_rows(monkeypatch, ARCH, edit, target)
    result = run("golden", "check", "--architecture", ARCH)
    assert result.exit_code == 1, result.output
    assert all(name in result.output for name in moved) and untouched not in result.output
    report = suite.check([ARCH])
    assert {r.case.target for r in report.failures()} == {target}
    assert all(r.passed for r in report.results if r.case.target != target)


@pytest.mark.parametrize("target, split, shard, moved", [
    (DEFAULT_TARGET, "mlp.gate.weight", ROW, "transformer.layers.1.mlp.gate.weight"),
    (PYTORCH.name, "mlp.down_proj.weight", CeilSplit(0), "model.layers.1.mlp.down_proj.weight"),
])
def test_split_dim_changed_fails_naming_the_tensor(monkeypatch, target, split, shard, moved) -> None:
    with_rows(monkeypatch, ARCH, lambda row: dataclasses.replace(row, shard=shard) if row.target.endswith(split) else row,
              target)
    report = suite.check([ARCH], target_names=[target])
    assert not report.passed and {r.case.target for r in report.results} == {target}
    changed = {(r.case.label, c.name) for r in report.results for c in r.tensors}
    assert ("tp2-pp2-bfloat16", moved) in changed
    assert all(name.endswith(split) for _, name in changed)
    assert all(r.passed for r in report.results if r.case.tp_size == 1)  # tp 1 splits nothing
    result = run("golden", "check", "--architecture", ARCH, "--target", target)
    assert result.exit_code == 1 and moved.replace(".1.", ".0.") in result.output


def test_dropped_vocab_padding_fails_naming_lm_head(monkeypatch) -> None:
    with_rows(monkeypatch, ARCH, lambda row: dataclasses.replace(row, shard=COLUMN) if row.shard is VOCAB else row)
    result = run("golden", "check", "--architecture", ARCH)
    assert result.exit_code == 1, result.output
    assert "conversion failed" in result.output and "lm_head.weight" in result.output


def test_dropped_source_op_fails_naming_the_norms(monkeypatch) -> None:
    with_rows(monkeypatch, SHARED_NORMS, lambda row: dataclasses.replace(row, ops=()))
    report = suite.check([SHARED_NORMS])
    names = {c.name for r in report.results for c in r.tensors}
    assert not report.passed and "transformer.ln_f.weight" in names
    assert names and all("layernorm" in n or "ln_f" in n for n in names)


def test_update_creates_missing_manifests_of_every_target_and_check_then_passes(tmp_path: Path) -> None:
    missing = run("golden", "check", "--architecture", ARCH, "--manifest-dir", tmp_path)
    assert missing.exit_code == 1 and "no manifest" in missing.output
    cases = [case for t in targets_for(get_card(ARCH)) for case in cases_for(ARCH, t.name)]
    updated = run("golden", "update", "--architecture", ARCH, "--manifest-dir", tmp_path)
    assert updated.exit_code == 0 and f"rewrote {len(cases)} manifest(s)" in updated.output
    assert {c.target for c in cases} == {DEFAULT_TARGET, PYTORCH.name}
    for case in cases:
        assert suite.manifest_path(case, tmp_path).read_text() == suite.manifest_path(case).read_text()
    assert run("golden", "check", "--architecture", ARCH, "--manifest_dir", tmp_path).exit_code == 0


def test_one_target_is_checked_and_updated_alone(tmp_path: Path) -> None:
    updated = run("golden", "update", "--architecture", ARCH, "--target", PYTORCH.name, "--manifest-dir", tmp_path)
    assert updated.exit_code == 0, updated.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.json")) == sorted(
        Path(PYTORCH.name) / f"{case.name.split('/')[-1]}.json" for case in cases_for(ARCH, PYTORCH.name))
    assert run("golden", "check", "--architecture", ARCH, "--target", PYTORCH.name, "--manifest-dir", tmp_path).exit_code == 0
    assert run("golden", "check", "--architecture", ARCH, "--manifest-dir", tmp_path).exit_code == 1  # default: none


def test_update_of_every_card_removes_stale_manifests_of_every_target(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(suite, "supported_architectures", lambda: [ARCH])
    (tmp_path / PYTORCH.name).mkdir()
    stale = [tmp_path / "GoneForCausalLM-tp1-pp1-float32.json", tmp_path / PYTORCH.name / "GoneForCausalLM-tp1-pp1-float32.json"]
    for path in stale:
        path.write_text("{}")
    report = suite.update(manifest_dir=tmp_path)
    assert report.passed is False and {r.status for r in report.results} == {"no manifest"}
    assert sorted(report.removed) == sorted(str(p.relative_to(tmp_path)) for p in stale)
    assert not any(p.exists() for p in stale) and suite.check(manifest_dir=tmp_path).passed


def test_a_card_golden_dir_holds_every_target(monkeypatch, tmp_path: Path) -> None:
    """A plugin's card keeps its manifests in its package (`golden_dir`), other targets in subfolders there."""
    with_card(monkeypatch, ARCH, golden_dir=tmp_path)
    assert run("golden", "update", "--architecture", ARCH).exit_code == 0
    for case in cases_for(ARCH, PYTORCH.name):
        assert (tmp_path / PYTORCH.name / f"{case.architecture}-{case.label}.json").read_text() == \
            (suite.MANIFESTS / f"{case.name}.json").read_text()
    assert len(list(tmp_path.glob("*.json"))) == len(cases_for(ARCH))
    assert run("golden", "check", "--architecture", ARCH).exit_code == 0


@pytest.mark.parametrize("args, fragment", [
    (["--architecture", SHARED_NORMS, "--target", PYTORCH.name], "is not supported"),
    (["--target", "no-such-target"], "no-such-target"),
])
def test_a_target_a_card_cannot_take_is_one_line_exit_2(args, fragment) -> None:
    result = run("golden", "check", *args)
    assert result.exit_code == 2 and fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize("target, section, key", [
    (DEFAULT_TARGET, None, "rotary_base"),  # config.json
    (PYTORCH.name, "rank0.json", "tp_size"),  # a target without one: each rank's metadata
])
def test_a_metadata_change_is_reported(tmp_path: Path, target, section, key) -> None:
    case = cases_for(ARCH, target)[0]
    manifest = Manifest.load(suite.manifest_path(case))
    config = copy.deepcopy(manifest.config)
    holder = config[section] if section else config
    actual, holder[key] = holder[key], "edited"
    path = suite.manifest_path(case, tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dataclasses.replace(manifest, config=config).dumps())
    report = suite.check([ARCH], tmp_path, target_names=[target])
    changed = [r for r in report.results if r.status == "changed"]
    assert [r.case for r in changed] == [case] and not changed[0].tensors
    assert [(c.key, c.expected, c.actual) for c in changed[0].config] == [(".".join(filter(None, (section, key))), "edited", actual)]


def test_values_are_exact_multiples_of_the_spacing() -> None:
    rng = np.random.Generator(np.random.PCG64(0))
    values = draw(rng, (1000,), 1.0)
    steps = (values.astype(np.float64) - 1.0) / 2.0**-18
    assert np.array_equal(steps, np.round(steps)) and steps.min() >= -(2**15) and steps.max() < 2**15
