"""The CI gate: all checks pass on a registered card, unmapped architectures are refused with their parameters,
and the Markdown summary and JUnit XML name every check."""

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
from shardproof.converter.card import cards, get_card
from shardproof.converter.transforms import Split
from shardproof.verify.outcomes import Status
from shardproof.converter.registry import Entry


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def gate_run(tmp_path_factory) -> tuple[object, str, ET.Element, str]:
    """`shardproof gate <first registered card> --summary S --junit-xml J`: result, summary, parsed XML, name."""
    tmp = tmp_path_factory.mktemp("gate")
    name = cards()[0].name
    result = run("gate", name, "--summary", tmp / "summary.md", "--junit-xml", tmp / "gate.xml")
    return result, (tmp / "summary.md").read_text(), ET.parse(tmp / "gate.xml").getroot(), name


def test_gate_passes_every_check_of_a_registered_card(gate_run) -> None:
    result, summary, _, name = gate_run
    assert result.exit_code == 0, result.output
    assert "## shardproof gate: passed" in summary and "## shardproof gate: passed" in result.stdout


def test_summary_names_every_check(gate_run) -> None:
    _, summary, _, name = gate_run
    assert f"| {name} | " + " | ".join(["✅ passed"] * len(CHECKS)) + " |" in summary
    for check in CHECKS:
        assert f"| {name} | {check} | ✅ passed |" in summary


def test_junit_xml_lists_every_check(gate_run) -> None:
    _, _, root, name = gate_run
    assert root.tag == "testsuites" and root.get("failures") == "0"
    cases = root.findall("./testsuite/testcase")
    assert [(c.get("classname"), c.get("name")) for c in cases] == [(f"shardproof.gate.{name}", c) for c in CHECKS]
    assert all(c.find("failure") is None and c.find("skipped") is None for c in cases)


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
])
def test_bad_gate_input_is_one_line_exit_2(args, fragment) -> None:
    result = run("gate", *args)
    assert result.exit_code == 2 and fragment in result.stderr, result.output


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


@dataclasses.dataclass(frozen=True)
class ReversedSplit(Split):
    """A column split whose ranks are written in reverse order but reassembled in order: a broken inverse."""

    def forward(self, sources, tp, tp_rank):
        return torch.chunk(sources[0], tp, dim=self.dim)[tp - 1 - tp_rank]


def test_property_check_catches_a_shard_without_its_exact_inverse(monkeypatch) -> None:
    arch = cards()[0].name
    card = get_card(arch)
    rows = tuple(dataclasses.replace(r, shard=ReversedSplit(0)) if r.target.endswith("mlp.fc.weight") else r for r in card.rows)
    monkeypatch.setitem(registry.CARDS.by_name, arch, Entry(arch, dataclasses.replace(card, rows=rows), __name__))
    failures = property_failures(arch)
    assert failures and "mlp.gate_proj.weight does not round-trip" in failures[0]


def test_coverage_fails_closed_on_an_unmapped_tensor(monkeypatch) -> None:
    arch = cards()[0].name
    card = get_card(arch)
    rows = tuple(r for r in card.rows if not r.target.endswith("mlp.proj.weight"))
    monkeypatch.setitem(registry.CARDS.by_name, arch, Entry(arch, dataclasses.replace(card, rows=rows), __name__))
    failures, _ = coverage_failures(arch)
    assert failures and all("mlp.down_proj.weight" in f for f in failures)


def test_not_run_is_distinguishable_and_not_a_pass() -> None:
    report = GateReport(["A"], ["verify"], [CheckResult("A", "verify", Status.NOT_RUN, "sharded: no runtime yet")])
    assert report.exit_code == 3
    assert "⏭️ not run" in markdown(report) and "incomplete" in markdown(report)
    skipped = ET.fromstring(junit_xml(report)).find("./testsuite/testcase/skipped")
    assert skipped is not None and skipped.get("message") == "sharded: no runtime yet"

