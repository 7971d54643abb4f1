"""The gate's five checks of one architecture in one target, each returning (status, detail), and the runner over
them.

coverage: every saved tensor of the tiny configs mapped or skipped by a named rule, every config field accounted
for; properties: the derandomized property check; golden: the architecture's golden cases against their
manifests; verify: each golden case's source model converted in its layout and verified in both modes
(reassembled and sharded); selftest: the mutation self-test restricted to the architecture. Every check runs in
each target the card supports (or those asked for).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from shardproof.converter.api import convert
from shardproof.converter.card import get_card
from shardproof.converter.target import targets_for
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


def coverage(architecture: str, target: str) -> Outcome:
    failures, configs = coverage_failures(architecture, target)
    return _judged(failures, f"{configs} tiny config(s): every saved tensor mapped or skipped by a named rule")


def properties(architecture: str, target: str) -> Outcome:
    return _judged(property_failures(architecture, target=target),
                   f"{EXAMPLES} derandomized examples convert and round-trip bit for bit")


def golden(architecture: str, target: str) -> Outcome:
    report = suite.check([architecture], target_names=[target])
    failures = []
    for r in report.failures():
        found = r.error or ", ".join(f"rank {c.rank} {c.name} {c.kind}" for c in r.tensors[:5])
        more = f" and {len(r.tensors) - 5} more" if len(r.tensors) > 5 else ""
        keys = f"; config keys changed: {', '.join(c.key for c in r.config)}" if r.config else ""
        failures.append(f"{r.case.name}: {r.status}: {found}{more}{keys}")
    return _judged(failures, f"{len(report.results)} case(s) match their manifests")


def verify(architecture: str, target: str) -> Outcome:
    outcomes, lines = [], []
    cases = cases_for(architecture, target)
    with tempfile.TemporaryDirectory(prefix="shardproof-gate-") as tmp:
        for case in cases:
            source = write_source_model(Path(tmp) / case.label / "hf", architecture, case.seed, **case.overrides)
            checkpoint = Path(tmp) / case.label / "rank-files"
            convert(source, checkpoint, **case.layout, target=target)
            checks = verify_checkpoint(source, checkpoint, "both", VERIFY_BATCH, target=target).checks
            outcomes += checks
            lines += [f"{case.label}: {o.status.value}: {o}" for o in checks if o.status is not Status.PASSED]
    status = overall(outcomes)
    if status is Status.PASSED:
        return status, f"{len(outcomes)} checks (reassembled and sharded) over {len(cases)} layouts"
    return status, "\n".join(lines)


def selftest(architecture: str, target: str) -> Outcome:
    report = run_selftest(architectures=[architecture], batch=SELFTEST_BATCH, target=target)
    missed = [f"{o.mutant.name if o.mutant else 'clean'} ({o.setup}): not ok" for o in [*report.clean, *report.mutants] if not o.ok]
    summary = (f"{len(report.clean)} clean setup(s) pass, {len(report.mutants)} mutant(s) caught and localized, "
               f"{len(report.not_applicable)} not applicable")
    return _judged(missed, summary)


CHECKS: dict[str, Callable[[str, str], Outcome]] = {
    "coverage": coverage, "properties": properties, "golden": golden, "verify": verify, "selftest": selftest,
}


def run_gate(architectures: Sequence[str], checks: Sequence[str] = tuple(CHECKS), log: Log | None = None,
             target_names: Sequence[str] | None = None, strict: bool = True) -> GateReport:
    """Every check of every architecture in each of `target_names` it supports (default: every target it
    supports); with `strict`, a named target an architecture does not support is bad input (ShardproofError,
    raised before any check runs). A check that raises fails with the error as its detail."""
    runs = [(architecture, target.name) for architecture in architectures
            for target in targets_for(get_card(architecture), target_names, strict)]
    report = GateReport(list(dict.fromkeys(architecture for architecture, _ in runs)), list(checks))
    for architecture, target in runs:
        for name in checks:
            if log:
                log(f"gate {architecture} [{target}]: {name}")
            start = time.perf_counter()
            try:
                status, detail = CHECKS[name](architecture, target)
            except Exception as e:  # noqa: BLE001  (the gate reports, it does not crash)
                status, detail = Status.FAILED, f"raised {type(e).__name__}: {e}"
            report.results.append(CheckResult(architecture, name, status, detail, time.perf_counter() - start, target))
    return report
