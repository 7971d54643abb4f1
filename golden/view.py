"""Rich tables of a golden report: each case's status, then every changed, missing and extra tensor per rank and
every changed config.json key."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .suite import GoldenReport

STYLES = {"same": "[green]same[/]", "changed": "[bold red]changed[/]", "no manifest": "[bold red]no manifest[/]",
          "error": "[bold red]conversion failed[/]"}


def cases_table(report: GoldenReport, title: str) -> Table:
    table = Table(title=title)
    for column in ("case", "status", "tensors changed / missing / extra", "config keys changed"):
        table.add_column(column, overflow="fold")
    for r in report.results:
        counts = " / ".join(str(sum(c.kind == kind for c in r.tensors)) for kind in ("changed", "missing", "extra"))
        detail = r.error if r.error else counts
        table.add_row(r.case.name, STYLES[r.status], detail, str(len(r.config)))
    return table


def tensors_table(report: GoldenReport) -> Table:
    table = Table(title="tensors that differ from the manifest (shape dtype sha256)")
    for column in ("case", "rank", "tensor", "change", "manifest", "now"):
        table.add_column(column, overflow="fold", no_wrap=column == "tensor")  # names stay whole, for grep
    for r in report.results:
        for c in r.tensors:
            table.add_row(r.case.name, str(c.rank), c.name, c.kind, str(c.expected or "-"), str(c.actual or "-"))
    return table


def config_table(report: GoldenReport) -> Table:
    table = Table(title="config.json keys that differ from the manifest")
    for column in ("case", "key", "manifest", "now"):
        table.add_column(column, overflow="fold")
    for r in report.results:
        for c in r.config:
            table.add_row(r.case.name, c.key, repr(c.expected), repr(c.actual))
    return table


def render(report: GoldenReport, console: Console, title: str) -> None:
    """The case table, and the tensor and config tables when anything differs."""
    console.print(cases_table(report, title))
    if any(r.tensors for r in report.results):
        console.print(tensors_table(report))
    if any(r.config for r in report.results):
        console.print(config_table(report))
