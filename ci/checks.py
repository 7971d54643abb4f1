"""The gate's five checks of one architecture, each returning (status, detail), and the runner over them.

coverage: every saved tensor of the tiny configs mapped or skipped by a named rule, every config field accounted
for; properties: the derandomized property check; golden: the architecture's golden cases against their
manifests; verify: each golden case's source model converted in its layout and verified in both modes
(reassembled and sharded); selftest: the mutation self-test restricted to the architecture.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from shardproof.converter.api import convert
from shardproof.golden import suite
from shardproof.golden.cases import cases_for
from shardproof.golden.source_model import write_source_model
from shardproof.verify.forward import BatchOptions
from shardproof.verify.outcomes import Status, overall
from shardproof.verify.selftest import run_selftest
from shardproof.verify.verification import verify_checkpoint

from .coverage import coverage_failures
from .properties import EXAMPLES, property_failures
from .results import CheckResult, GateReport

Outcome = tuple[Status, str]
Log = Callable[[str], None]
VERIFY_BATCH = BatchOptions(device="cpu", num_sequences=1, seq_len=64, seed=0)
SELFTEST_BATCH = BatchOptions(device="cpu", num_sequences=1, seq_len=256, seed=0)  # the self-test's calibration


def _judged(failures: list[str], passed: str) -> Outcome:
    return (Status.FAILED, "\n".join(failures)) if failures else (Status.PASSED, passed)


def coverage(architecture: str) -> Outcome:
    failures, configs = coverage_failures(architecture)
    return _judged(failures, f"{configs} tiny config(s): every saved tensor mapped or skipped by a named rule")


def properties(architecture: str) -> Outcome:
    return _judged(property_failures(architecture), f"{EXAMPLES} derandomized examples convert and round-trip bit for bit")


def golden(architecture: str) -> Outcome:
    report = suite.check([architecture])
    failures = []
    for r in report.failures():
        found = r.error or ", ".join(f"rank {c.rank} {c.name} {c.kind}" for c in r.tensors[:5])
        more = f" and {len(r.tensors) - 5} more" if len(r.tensors) > 5 else ""
        keys = f"; config keys changed: {', '.join(c.key for c in r.config)}" if r.config else ""
        failures.append(f"{r.case.name}: {r.status}: {found}{more}{keys}")
    return _judged(failures, f"{len(report.results)} case(s) match their manifests")


def verify(architecture: str) -> Outcome:
    outcomes, lines = [], []
    with tempfile.TemporaryDirectory(prefix="shardproof-gate-") as tmp:
        for case in cases_for(architecture):
            source = write_source_model(Path(tmp) / case.name / "hf", architecture, case.seed, **case.overrides)
            checkpoint = Path(tmp) / case.name / "trt"
            convert(source, checkpoint, **case.layout)
            checks = verify_checkpoint(source, checkpoint, "both", VERIFY_BATCH).checks
            outcomes += checks
            lines += [f"{case.label}: {o.status.value}: {o}" for o in checks if o.status is not Status.PASSED]
    status = overall(outcomes)
    if status is Status.PASSED:
        return status, f"{len(outcomes)} checks (reassembled and sharded) over {len(cases_for(architecture))} layouts"
    return status, "\n".join(lines)


def selftest(architecture: str) -> Outcome:
    report = run_selftest(architectures=[architecture], batch=SELFTEST_BATCH)
    missed = [f"{o.mutant.name if o.mutant else 'clean'} ({o.setup}): not ok" for o in [*report.clean, *report.mutants] if not o.ok]
    summary = (f"{len(report.clean)} clean setup(s) pass, {len(report.mutants)} mutant(s) caught and localized, "
               f"{len(report.not_applicable)} not applicable")
    return _judged(missed, summary)


CHECKS: dict[str, Callable[[str], Outcome]] = {
    "coverage": coverage, "properties": properties, "golden": golden, "verify": verify, "selftest": selftest,
}


def run_gate(architectures: Sequence[str], checks: Sequence[str] = tuple(CHECKS), log: Log | None = None) -> GateReport:
    """Every check of every architecture; a check that raises fails with the error as its detail."""
    report = GateReport(list(architectures), list(checks))
    for architecture in architectures:
        for name in checks:
            if log:
                log(f"gate {architecture}: {name}")
            start = time.perf_counter()
            try:
                status, detail = CHECKS[name](architecture)
            except Exception as e:  # noqa: BLE001  (the gate reports, it does not crash)
                status, detail = Status.FAILED, f"raised {type(e).__name__}: {e}"
            report.results.append(CheckResult(architecture, name, status, detail, time.perf_counter() - start))
    return report
