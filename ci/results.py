"""What the gate found: one result per architecture, target and check, and the gate's overall status and exit code."""

from __future__ import annotations

from dataclasses import dataclass, field

from shardproof.converter.plan import DEFAULT_TARGET
from shardproof.verify.outcomes import Status

EXIT_CODES = {Status.PASSED: 0, Status.FAILED: 1, Status.NOT_RUN: 3}


@dataclass(frozen=True)
class CheckResult:
    """One check of one architecture in one target (converter/target.py): passed, failed or not run, with what it
    found (`detail`) and its time."""

    architecture: str
    check: str
    status: Status
    detail: str
    seconds: float = 0.0
    target: str = DEFAULT_TARGET


@dataclass
class GateReport:
    architectures: list[str]
    checks: list[str]
    results: list[CheckResult] = field(default_factory=list)

    @property
    def status(self) -> Status:
        """failed if any check failed, else not run if any did not run, else passed."""
        statuses = {r.status for r in self.results}
        return next((s for s in (Status.FAILED, Status.NOT_RUN) if s in statuses), Status.PASSED)

    @property
    def exit_code(self) -> int:
        """0 only when every check passed; 1 a check failed; 3 nothing failed but a check did not run."""
        return EXIT_CODES[self.status]

    @property
    def runs(self) -> list[tuple[str, str]]:
        """Every (architecture, target) the gate checked, in order."""
        return list(dict.fromkeys((r.architecture, r.target) for r in self.results))

    def result(self, architecture: str, check: str, target: str = DEFAULT_TARGET) -> CheckResult:
        return next(r for r in self.results if (r.architecture, r.check, r.target) == (architecture, check, target))
