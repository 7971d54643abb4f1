"""The gate's report for CI systems: a Markdown job summary and JUnit XML (one testcase per architecture x target x
check)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from shardproof.verify.outcomes import Status

from .results import GateReport

MARKS = {Status.PASSED: "✅ passed", Status.FAILED: "❌ failed", Status.NOT_RUN: "⏭️ not run"}
WHAT = {
    "coverage": "every tensor transformers saves for the tiny configs is mapped by a row or skipped by a named rule",
    "properties": "derandomized property examples: rank files hold the plan, reassembly is bit-exact",
    "golden": "the golden cases convert to the committed manifests (per-rank SHA-256)",
    "verify": "verification in both modes (reassembled, sharded) across tp/pp/dtype layouts",
    "selftest": "the mutation self-test: every applicable fault caught and localized",
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def markdown(report: GateReport) -> str:
    """A table of architecture and target x check, then every check's detail and time."""
    title = {Status.PASSED: "passed", Status.FAILED: "FAILED", Status.NOT_RUN: "incomplete (a check did not run)"}
    lines = [f"## shardproof gate: {title[report.status]}", "",
             "| architecture | target | " + " | ".join(report.checks) + " |", "|---" * (len(report.checks) + 2) + "|"]
    for arch, target in report.runs:
        marks = [MARKS[report.result(arch, c, target).status] for c in report.checks]
        lines.append(f"| {arch} | {target} | " + " | ".join(marks) + " |")
    lines += ["", "| check | what it proves |", "|---|---|"]
    lines += [f"| {c} | {WHAT[c]} |" for c in report.checks]
    lines += ["", "### Details", "", "| architecture | target | check | status | seconds | detail |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r.architecture} | {r.target} | {r.check} | {MARKS[r.status]} | {r.seconds:.1f} | {_cell(r.detail)} |"
              for r in report.results]
    return "\n".join(lines) + "\n"


def junit_xml(report: GateReport) -> str:
    """JUnit XML: a testsuite per architecture, a testcase per target and check (classname
    `shardproof.gate.<architecture>.<target>`, name the check); failed -> <failure>, not run -> <skipped>."""
    def counts(results: list) -> dict[str, str]:
        return {"tests": str(len(results)),
                "failures": str(sum(r.status is Status.FAILED for r in results)),
                "skipped": str(sum(r.status is Status.NOT_RUN for r in results)),
                "errors": "0", "time": f"{sum(r.seconds for r in results):.3f}"}

    root = ET.Element("testsuites", name="shardproof gate", **counts(report.results))
    for arch in report.architectures:
        results = [r for r in report.results if r.architecture == arch]
        suite = ET.SubElement(root, "testsuite", name=arch, **counts(results))
        for r in results:
            case = ET.SubElement(suite, "testcase", classname=f"shardproof.gate.{arch}.{r.target}", name=r.check,
                                 time=f"{r.seconds:.3f}")
            first_line = r.detail.splitlines()[0] if r.detail else r.status.value
            if r.status is Status.FAILED:
                ET.SubElement(case, "failure", message=first_line).text = r.detail
            elif r.status is Status.NOT_RUN:
                ET.SubElement(case, "skipped", message=first_line).text = r.detail
            else:
                ET.SubElement(case, "system-out").text = r.detail
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
