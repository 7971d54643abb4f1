"""The golden suite: `golden check` passes on the committed manifests, and a changed mapper rule fails it,
naming the tensors it moved."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from typer.testing import CliRunner

import shardproof.cli as cli
from shardproof.converter import card as registry
from shardproof.converter.card import Row, get_card
from shardproof.converter.transforms import COLUMN, ROW, VOCAB
from shardproof.golden import suite
from shardproof.golden.cases import cases_for
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


def with_rows(monkeypatch, architecture: str, edit: Callable[[Row], Row]) -> None:
    """Register `architecture`'s card with `edit` applied to every row, for this test only."""
    card = get_card(architecture)
    monkeypatch.setitem(registry.CARDS.by_name, architecture, Entry(architecture, dataclasses.replace(card, rows=tuple(map(edit, card.rows))), __name__))


def test_golden_check_passes_on_the_committed_manifests() -> None:
    result = run("golden", "check")
    assert result.exit_code == 0, result.output
    cases = [case for card in registry.cards() for case in cases_for(card.name)]
    assert result.output.count("│ same ") == len(cases) and "golden check failed" not in result.output


def test_every_registered_card_has_a_manifest_per_case() -> None:
    expected = {suite.manifest_path(case) for card in registry.cards() for case in cases_for(card.name)}
    directories = {suite.MANIFESTS} | {path.parent for path in expected}
    assert expected == {path for directory in directories for path in directory.glob("*.json")}


def test_swapped_target_names_fail_naming_both_tensors(monkeypatch) -> None:
    swap = {"transformer.layers.{i}.mlp.fc.weight": "transformer.layers.{i}.mlp.gate.weight",
            "transformer.layers.{i}.mlp.gate.weight": "transformer.layers.{i}.mlp.fc.weight"}
    with_rows(monkeypatch, ARCH, lambda row: dataclasses.replace(row, target=swap.get(row.target, row.target)))
    result = run("golden", "check", "--architecture", ARCH)
    assert result.exit_code == 1, result.output
    assert "transformer.layers.0.mlp.fc.weight" in result.output
    assert "transformer.layers.2.mlp.gate.weight" in result.output
    assert "attention.qkv.weight" not in result.output


def test_split_dim_changed_from_column_to_row_fails_naming_the_tensor(monkeypatch) -> None:
    with_rows(monkeypatch, ARCH, lambda row: dataclasses.replace(row, shard=ROW) if row.target.endswith("mlp.gate.weight") else row)
    report = suite.check([ARCH])
    assert not report.passed
    moved = {(r.case.label, c.name) for r in report.results for c in r.tensors}
    assert ("tp2-pp2-bfloat16", "transformer.layers.1.mlp.gate.weight") in moved
    assert all(name.endswith("mlp.gate.weight") for _, name in moved)
    assert all(r.passed for r in report.results if r.case.tp_size == 1)  # tp 1 splits nothing
    result = run("golden", "check", "--architecture", ARCH)
    assert result.exit_code == 1 and "transformer.layers.0.mlp.gate.weight" in result.output


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


def test_update_creates_missing_manifests_and_check_then_passes(tmp_path: Path) -> None:
    missing = run("golden", "check", "--architecture", ARCH, "--manifest-dir", tmp_path)
    assert missing.exit_code == 1 and "no manifest" in missing.output
    updated = run("golden", "update", "--architecture", ARCH, "--manifest-dir", tmp_path)
    assert updated.exit_code == 0 and f"rewrote {len(cases_for(ARCH))} manifest(s)" in updated.output
    for case in cases_for(ARCH):
        assert (tmp_path / f"{case.name}.json").read_text() == (suite.MANIFESTS / f"{case.name}.json").read_text()
    assert run("golden", "check", "--architecture", ARCH, "--manifest_dir", tmp_path).exit_code == 0


def test_config_key_change_is_reported(monkeypatch, tmp_path: Path) -> None:
    case = cases_for(ARCH)[0]
    manifest = suite.MANIFESTS / f"{case.name}.json"
    (tmp_path / manifest.name).write_text(manifest.read_text().replace('"rotary_base": 500000.0', '"rotary_base": 10000.0'))
    report = suite.check([ARCH], tmp_path)
    changed = [r for r in report.results if r.status == "changed"]
    assert [(c.key, c.expected, c.actual) for c in changed[0].config] == [("rotary_base", 10000.0, 500000.0)]


def test_values_are_exact_multiples_of_the_spacing() -> None:
    rng = np.random.Generator(np.random.PCG64(0))
    values = draw(rng, (1000,), 1.0)
    steps = (values.astype(np.float64) - 1.0) / 2.0**-18
    assert np.array_equal(steps, np.round(steps)) and steps.min() >= -(2**15) and steps.max() < 2**15
