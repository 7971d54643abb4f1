"""What became of each requested check: passed, failed, or not run (with the reason)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Iterable


class Status(str, Enum):
    PASSED = "passed"
    FAILED = "failed"
    NOT_RUN = "not run"


@dataclass(frozen=True)
class CheckOutcome:
    """One check of one mode; `reason` says why it failed or did not run (None when it passed)."""

    mode: str
    check: str
    status: Status
    reason: str | None = None

    def __str__(self) -> str:
        return f"{self.mode} {self.check}: {self.reason}"


def judged(mode: str, check: str, failures: list[str]) -> CheckOutcome:
    """Passed when `failures` is empty, else failed with them as the reason."""
    if failures:
        return CheckOutcome(mode, check, Status.FAILED, "; ".join(failures))
    return CheckOutcome(mode, check, Status.PASSED)


def not_run(mode: str, checks: Iterable[str], reason: str) -> list[CheckOutcome]:
    return [CheckOutcome(mode, check, Status.NOT_RUN, reason) for check in checks]


def overall(outcomes: Iterable[CheckOutcome]) -> Status:
    """FAILED if any check failed, else NOT_RUN if any did not run, else PASSED."""
    statuses = {o.status for o in outcomes}
    return next((s for s in (Status.FAILED, Status.NOT_RUN) if s in statuses), Status.PASSED)
