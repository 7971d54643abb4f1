"""The CI gate: all checks pass on a registered card in every target it supports, unmapped architectures are
refused with their parameters, and the Markdown summary and JUnit XML name every check and its target."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET

import pytest
import torch
from typer.testing import CliRunner

from shardproof.ci.checks import CHECKS
from shardproof.ci.coverage import coverage_failures
from shardproof.ci.properties import property_failures
from shardproof.ci.results import CheckResult, GateReport
from shardproof.ci.summary import junit_xml, markdown
from shardproof.cli import app
from shardproof.converter import card as registry
from shardproof.converter.card import cards, get_card, supported_architectures
from shardproof.converter.plan import DEFAULT_TARGET
from shardproof.converter.target import PYTORCH, targets_for
from shardproof.converter.transforms import Split
from shardproof.golden.cases import refused
from shardproof.verify.outcomes import Status
from shardproof.converter.registry import Entry


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def both_targets() -> str:
    """The first registered card that more than one target supports."""
    return next(card.name for card in cards() if len(targets_for(card)) > 1)


def with_target_rows(monkeypatch, architecture: str, target: str, edit) -> None:
    """Register `architecture`'s card with `edit(rows)` as its rows in `target`, for this test only."""
    card = get_card(architecture)
    if target == DEFAULT_TARGET:
        changed = dataclasses.replace(card, rows=edit(card.rows))
    else:
        held = card.targets[target]
        changed = dataclasses.replace(card, targets={**card.targets, target: dataclasses.replace(held, rows=edit(held.rows))})
    monkeypatch.setitem(registry.CARDS.by_name, architecture, Entry(architecture, changed, __name__))


@pytest.fixture(scope="module")
def gate_run(tmp_path_factory) -> tuple[object, str, ET.Element, str]:
    """`shardproof gate <a card of both targets> --summary S --junit-xml J`: result, summary, parsed XML, name."""
    tmp = tmp_path_factory.mktemp("gate")
    name = both_targets()
    result = run("gate", name, "--summary", tmp / "summary.md", "--junit-xml", tmp / "gate.xml")
    return result, (tmp / "summary.md").read_text(), ET.parse(tmp / "gate.xml").getroot(), name


def test_gate_passes_every_check_of_a_registered_card(gate_run) -> None:
    result, summary, _, name = gate_run
    assert result.exit_code == 0, result.output
    assert "## shardproof gate: passed" in summary and "## shardproof gate: passed" in result.stdout


def test_summary_names_every_check_in_every_target(gate_run) -> None:
    _, summary, _, name = gate_run
    for target in targets_for(get_card(name)):
        assert f"| {name} | {target.name} | " + " | ".join(["✅ passed"] * len(CHECKS)) + " |" in summary
        for check in CHECKS:
            assert f"| {name} | {target.name} | {check} | ✅ passed |" in summary
    assert summary.count(f"| {name} | ") == 2 * len(CHECKS) + 2  # detail rows and overview rows, nothing else


def test_junit_xml_lists_every_check_in_every_target(gate_run) -> None:
    _, _, root, name = gate_run
    assert root.tag == "testsuites" and root.get("failures") == "0"
    cases = root.findall("./testsuite/testcase")
    expected = [(f"shardproof.gate.{name}.{t.name}", c) for t in targets_for(get_card(name)) for c in CHECKS]
    assert [(c.get("classname"), c.get("name")) for c in cases] == expected and len(expected) == 2 * len(CHECKS)
    assert all(c.find("failure") is None and c.find("skipped") is None for c in cases)


def test_all_in_one_target_gates_the_cards_that_support_it(tmp_path) -> None:
    result = run("gate", "--all", "--target", PYTORCH.name, "--check", "golden", "--junit-xml", tmp_path / "gate.xml")
    assert result.exit_code == 0, result.output
    root = ET.parse(tmp_path / "gate.xml").getroot()
    supported = [name for name in supported_architectures() if PYTORCH.supports(get_card(name))]
    assert [c.get("classname") for c in root.iter("testcase")] == [f"shardproof.gate.{n}.{PYTORCH.name}" for n in supported]
    assert [s.get("name") for s in root.iter("testsuite")] == supported  # no empty suite for a card left out
    assert len(supported) < len(cards())  # a card it does not support is left out, not failed


def test_unmapped_architecture_exits_2_listing_its_parameters() -> None:
    result = run("gate", "GPTNeoXForCausalLM")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "GPTNeoXForCausalLM" in lines[0]
    for parameter in ("gpt_neox.embed_in.weight", "gpt_neox.layers.{n}.attention.query_key_value.weight", "embed_out.weight"):
        assert parameter in lines[0]


@pytest.mark.parametrize("args, fragment", [
    (["NoSuchModelForCausalLM"], "nor a transformers model class"),
    (["--all", "LlamaForCausalLM"], "not both"),
    ([], "not both"),
    (["--all", "--check", "speed"], "--check 'speed'"),
    (["--all", "--target", "no-such-target"], "no-such-target"),
    ([next(c.name for c in cards() if not PYTORCH.supports(c)), "--target", PYTORCH.name], "is not supported"),
])
def test_bad_gate_input_is_one_line_exit_2(args, fragment) -> None:
    result = run("gate", *args)
    assert result.exit_code == 2 and fragment in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "shardproof gate" not in result.stdout


def test_a_failing_check_is_a_junit_failure_naming_the_tensors(monkeypatch, tmp_path) -> None:
    arch = cards()[0].name
    card = get_card(arch)
    swap = {"transformer.layers.{i}.attention.dense.weight": "transformer.layers.{i}.mlp.proj.weight",
            "transformer.layers.{i}.mlp.proj.weight": "transformer.layers.{i}.attention.dense.weight"}
    rows = tuple(dataclasses.replace(r, target=swap.get(r.target, r.target)) for r in card.rows)
    monkeypatch.setitem(registry.CARDS.by_name, arch, Entry(arch, dataclasses.replace(card, rows=rows), __name__))
    result = run("gate", arch, "--check", "coverage", "--check", "golden", "--junit_xml", tmp_path / "gate.xml")
    assert result.exit_code == 1, result.output
    failure = ET.parse(tmp_path / "gate.xml").find("./testsuite/testcase[@name='golden']/failure")
    assert failure is not None and "transformer.layers.0.mlp.proj.weight" in failure.text
    assert ET.parse(tmp_path / "gate.xml").find("./testsuite/testcase[@name='coverage']/failure") is None


def test_a_failure_in_one_target_fails_that_target_alone(monkeypatch, tmp_path) -> None:
    """The backend's fused gate_up_proj rule changed to [up_r; gate_r]: that target's golden check fails naming the
    tensor (a rule that converter and reassembler share is the goldens' to catch), the checkpoint's passes."""
    arch = both_targets()
    with_target_rows(monkeypatch, arch, PYTORCH.name, lambda rows: tuple(
        dataclasses.replace(r, sources=r.sources[::-1]) if r.target.endswith("mlp.gate_up_proj.weight") else r
        for r in rows))
    result = run("gate", arch, "--check", "coverage", "--check", "golden", "--junit-xml", tmp_path / "gate.xml",
                 "--summary", tmp_path / "summary.md")
    assert result.exit_code == 1, result.output
    root = ET.parse(tmp_path / "gate.xml").getroot()
    failed = [(c.get("classname"), c.get("name")) for c in root.iter("testcase") if c.find("failure") is not None]
    assert failed == [(f"shardproof.gate.{arch}.{PYTORCH.name}", "golden")]
    golden = root.find(f"./testsuite/testcase[@classname='shardproof.gate.{arch}.{PYTORCH.name}'][@name='golden']/failure")
    assert "model.layers.0.mlp.gate_up_proj.weight" in golden.text
    summary = (tmp_path / "summary.md").read_text()
    assert f"| {arch} | {DEFAULT_TARGET} | ✅ passed | ✅ passed |" in summary
    assert f"| {arch} | {PYTORCH.name} | ✅ passed | ❌ failed |" in summary


@dataclasses.dataclass(frozen=True)
class ReversedSplit(Split):
    """A column split whose ranks are written in reverse order but reassembled in order: a broken inverse."""

    def forward(self, sources, tp, tp_rank):
        return torch.chunk(sources[0], tp, dim=self.dim)[tp - 1 - tp_rank]


@pytest.mark.parametrize("target, row, source", [
    (DEFAULT_TARGET, "mlp.fc.weight", "mlp.gate_proj.weight"),
    (PYTORCH.name, "mlp.down_proj.weight", "mlp.down_proj.weight"),
])
def test_property_check_catches_a_shard_without_its_exact_inverse(monkeypatch, target, row, source) -> None:
    arch = both_targets()
    with_target_rows(monkeypatch, arch, target, lambda rows: tuple(
        dataclasses.replace(r, shard=ReversedSplit(r.shard.dim))
        if r.target.endswith(row) else r for r in rows))
    failures = property_failures(arch, target=target)
    assert failures and f"{source} does not round-trip" in failures[0]


@pytest.mark.parametrize("target, row, source", [
    (DEFAULT_TARGET, "mlp.proj.weight", "mlp.down_proj.weight"),
    (PYTORCH.name, "self_attn.o_proj.weight", "self_attn.o_proj.weight"),
])
def test_coverage_fails_closed_on_an_unmapped_tensor(monkeypatch, target, row, source) -> None:
    arch = both_targets()
    with_target_rows(monkeypatch, arch, target, lambda rows: tuple(r for r in rows if not r.target.endswith(row)))
    failures, _ = coverage_failures(arch, target)
    assert failures and all(source in f for f in failures)
    assert coverage_failures(arch, next(t.name for t in targets_for(get_card(arch)) if t.name != target))[0] == []


def test_a_model_the_target_refuses_is_no_property_example() -> None:
    """Only a refusal the card declares for the target (a condition in `TargetRows.refused`) is left out."""
    layout = dict(dtype="float32", tp_size=2, pp_size=1, use_parallel_embedding=False)
    for card in cards():
        if PYTORCH.supports(card):
            declared = any("tie_word_embeddings" in c for c, _ in PYTORCH.rows(card).refused)
            assert refused(card, dict(tie_word_embeddings=True), PYTORCH, layout) == declared, card.name
            assert not refused(card, {}, PYTORCH, layout)
        assert not refused(card, dict(tie_word_embeddings=True), DEFAULT_TARGET, layout)
    assert any(any(c for c, _ in PYTORCH.rows(card).refused) for card in cards() if PYTORCH.supports(card))


def test_not_run_is_distinguishable_and_not_a_pass() -> None:
    report = GateReport(["A"], ["verify"], [CheckResult("A", "verify", Status.NOT_RUN, "sharded: no runtime yet", target="T")])
    assert report.exit_code == 3
    assert "| A | T | ⏭️ not run |" in markdown(report) and "incomplete" in markdown(report)
    skipped = ET.fromstring(junit_xml(report)).find("./testsuite/testcase/skipped")
    assert skipped is not None and skipped.get("message") == "sharded: no runtime yet"

