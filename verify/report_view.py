"""The equivalence report on a terminal: rich tables for stages, differing tensors, logit metrics and timings."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table
from rich.text import Text

from shardproof.converter.checkpoint import Violation
from .equivalence import EquivalenceReport
from .metrics import LogitMetrics, Position
from .outcomes import CheckOutcome, Status
from .sharded_check import ShardedReport
from .dtype_cost import COST_FACTOR
from .thresholds import Check
from .verification import Verification

MAX_ROWS = 20
# LogitMetrics' fields in the logits table: its numbers, then what it says in words (a dtype, positions).
WORDS = ("noise_dtype", "worst_cosine", "worst_flip")
NUMBERS = tuple(n for n in LogitMetrics.__dataclass_fields__ if n not in WORDS and n != "positions")
PASS, FAIL, SKIP = "[bold green]pass[/]", "[bold red]FAIL[/]", "[yellow]not run[/]"


def _num(value: float) -> str:
    if isinstance(value, int) or not math.isfinite(value):
        return str(value)
    return f"{value:.6g}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.3e}"


def _index(index: tuple[int, ...] | None) -> str:
    return "-" if index is None else str(list(index))


def _cell(outcome: CheckOutcome) -> str:
    return {Status.PASSED: PASS, Status.FAILED: FAIL, Status.NOT_RUN: SKIP}[outcome.status]


def _check_line(check: Check) -> str:
    return f"{check.metric} {_num(check.value)} {check.op} {_num(check.threshold)}"


def summary_table(report: EquivalenceReport) -> Table:
    """One row per check: its status and what it found."""
    table = Table(title=f"{report.architecture} {report.dtype} tp={report.tp_size} pp={report.pp_size} on {report.device}")
    for column in ("stage", "result", "details"):
        table.add_column(column)
    w, f, p = report.weights, report.forward, report.precision
    found = {
        "reassembly": "replicas, padding and tensor set as planned",
        "config": "model-defining fields equal",
        "forward": f"logits bit-identical ({report.num_sequences} x {report.seq_len} tokens)",
    }
    if w is not None:
        found["weights"] = f"{len(w.tensors) - len(w.mismatches)}/{len(w.tensors)} tensors bit-identical to the source as {w.dtype}"
        found["weights"] += f"; {len(w.extra)} extra tensor(s)" if w.extra else ""
        found["weights"] += f"; {len(w.skipped)} skipped on purpose" if w.skipped else ""
    if report.config_differences:
        found["config"] = "; ".join(report.config_differences)
    if f is not None and not f.identical and f.metrics is not None:
        m = f.metrics
        found["forward"] = (f"sequences {f.differing_sequences} differ: max abs diff {_num(m.max_abs_diff)}, "
                            f"KL {_num(m.kl_mean)}, top-1 {m.top1_agreement:.2%}; worst cosine at {m.worst_cosine}")
    if p is not None:
        nonfinite = f"; first non-finite output: {p.first_nonfinite_module}" if p.first_nonfinite_module else ""
        found["precision"] = f"float32 vs {p.dtype}: {', '.join(map(_check_line, p.checks.values()))}{nonfinite}"
    for outcome in report.checks:
        detail = found.get(outcome.check) if outcome.status is not Status.NOT_RUN else None
        table.add_row(outcome.check, _cell(outcome), Text(detail or outcome.reason or ""))
    loc = report.localization
    if loc is not None:
        if loc.module is None:
            text = f"no module output differs on sequence {loc.sequence}"
        else:
            text = f"first divergence at {loc.module} (sequence {loc.sequence}, max abs diff {_num(loc.max_abs_diff)})"
            if loc.detail:
                text += f": {loc.detail}"
            text += f"; differing tensors in {loc.scope}: {', '.join(loc.differing_tensors) or 'none'}"
        table.add_row("localization", FAIL, Text(text))
    return table


def violations_table(violations: list[Violation]) -> Table:
    """Each violation (the first MAX_ROWS): rank, tensor, problem."""
    table = Table(title=f"{len(violations)} violation(s)", title_style="bold red")
    for column in ("rank", "tensor", "problem"):
        table.add_column(column)
    for v in violations[:MAX_ROWS]:
        table.add_row("-" if v.rank is None else str(v.rank), Text(v.tensor), Text(v.problem))
    if len(violations) > MAX_ROWS:
        table.caption = f"... and {len(violations) - MAX_ROWS} more"
    return table


def mismatch_tables(report: EquivalenceReport) -> list[Table]:
    """The differing source tensors (first MAX_ROWS) and the rank-file tensors they trace back to."""
    w = report.weights
    tables = []
    rows = [(t.name, str(list(t.shape)), _num(t.max_abs_diff), _index(t.first_diff_index), t.problem or "")
            for t in w.mismatches]
    rows += [(name, "-", "-", "-", "extra tensor, not in the source") for name in w.extra]
    if rows:
        table = Table(title=f"{len(rows)} tensor(s) differ from the source", title_style="bold red")
        for column in ("tensor", "shape", "max abs diff", "first differing index", "problem"):
            table.add_column(column)
        for row in rows[:MAX_ROWS]:
            table.add_row(*(Text(cell) for cell in row))
        if len(rows) > MAX_ROWS:
            table.caption = f"... and {len(rows) - MAX_ROWS} more (see --report)"
        tables.append(table)
    if w.ranks:
        table = Table(title="rank-file tensors that differ from the source's shard", title_style="bold red")
        for column in ("rank", "tensor", "made from", "max abs diff", "first differing index"):
            table.add_column(column)
        for r in w.ranks[:MAX_ROWS]:
            table.add_row(str(r.rank), Text(r.tensor), Text(", ".join(r.sources)), _num(r.max_abs_diff), _index(r.first_diff_index))
        if len(w.ranks) > MAX_ROWS:
            table.caption = f"... and {len(w.ranks) - MAX_ROWS} more (see --report)"
        tables.append(table)
    return tables


def metrics_table(report: EquivalenceReport) -> Table:
    """Logit metrics: source vs checkpoint in the checkpoint dtype (must be exact), float32 vs that dtype."""
    f, p = report.forward, report.precision
    table = Table(title="logits")
    table.add_column("metric")
    table.add_column(f"source {report.dtype} vs checkpoint", justify="right")
    table.add_column(f"source float32 vs {report.dtype}", justify="right")
    table.add_column("limit (the cost is the model's own: only non-finite and your limits fail)", justify="right")
    checks = p.checks
    for name in NUMBERS:
        exact = _num(getattr(f.metrics, name)) if f.metrics else "identical" if f.identical else "-"
        cost = _num(getattr(p.metrics, name))
        threshold = f"{checks[name].op} {_num(checks[name].threshold)}" if name in checks else ""
        table.add_row(name, exact, cost, threshold)
    for name in WORDS:
        exact = _words(getattr(f.metrics, name)) if f.metrics else "identical" if f.identical else "-"
        table.add_row(name, exact, _words(getattr(p.metrics, name)), "")
    return table


def _words(value: str | Position | None) -> Text:
    return Text("-" if value is None else str(value))


def _worst(metrics: LogitMetrics) -> Text:
    """Near-ties, and the worst positions, of one comparison's metrics."""
    lines = [f"{metrics.near_ties}/{metrics.positions} near-ties at {metrics.noise_dtype} noise",
             f"worst cosine: {metrics.worst_cosine}"]
    if metrics.worst_flip is not None:
        lines.append(f"worst decisive flip: {metrics.worst_flip}")
    return Text("\n".join(lines))


def sharded_table(report: ShardedReport) -> Table:
    """The sharded mode: each logit comparison with its checks, then where it first diverged."""
    title = f"sharded runtime vs HF: {report.dtype or '?'} tp={report.tp_size} pp={report.pp_size} on {report.device}"
    table = Table(title=title)
    for column in ("comparison", "result", "relative error", "checks", "positions"):
        table.add_column(column)
    if report.structural:
        table.add_row("structure", FAIL, "-", Text(report.structural), "-")
    for c in report.comparisons:
        checks = "; ".join(map(_check_line, c.checks.values()))
        table.add_row(f"{c.name}: {c.candidate} vs {c.reference}", PASS if c.passed else FAIL, _num(c.relative_error),
                      checks, _worst(c.metrics))
    if report.teacher_forced is not None:
        forced = report.teacher_forced
        worst = forced.worst
        beyond = f"first beyond: {forced.first_beyond}" if forced.first_beyond else f"none with {forced.criterion}"
        table.add_row("teacher-forced stages: runtime on HF's input to each, float32", "-",
                      _num(worst.relative_error), f"largest at {worst.stage}; {beyond}", "-")
    if report.localization is not None and report.localization.first_diverging:
        loc = report.localization
        table.add_row("first divergence", FAIL, "-", f"{loc.first_diverging} (sequence {loc.sequence}, {loc.criterion})", "-")
    return table


def render(result: Verification, console: Console) -> None:
    """Print the notes, every mode's report, the timings and the verdict."""
    for note in result.notes:
        console.print(Text.assemble(("note:", "yellow"), " ", note), highlight=False)
    report = result.reassembled
    if report is not None:
        console.print(summary_table(report))
        if report.violations:
            console.print(violations_table(report.violations))
        if report.weights is not None:
            for table in mismatch_tables(report):
                console.print(table)
        if report.forward is not None:
            console.print(metrics_table(report))
        for note in report.notes:
            console.print(Text.assemble(("note:", "yellow"), " ", note), highlight=False)
    if result.sharded is not None:
        console.print(sharded_table(result.sharded))
    console.print("time: " + ", ".join(f"{stage} {seconds:.2f}s" for stage, seconds in result.timings.items()), style="dim")
    if result.status is Status.FAILED:
        console.print(Text.assemble(("FAIL", "bold red"), ": " + "; ".join(result.failures)), highlight=False)
        return
    claims = []
    if report is not None:
        claims.append(f"reassembled: the checkpoint is the model, bit for bit; {report.dtype} costs the model what HF's own "
                      f"{report.dtype} forward costs it (KL {report.precision.metrics.kl_mean:.3g})")
    if result.sharded is not None:
        claims.append("sharded: run as TensorRT-LLM runs it, the checkpoint computes what the model computes"
                      + ("" if result.sharded.dtype == "float32" else
                         f", at a {result.sharded.dtype} cost within {COST_FACTOR:g} x the model's own"))
    if result.status is Status.NOT_RUN:
        not_run = "; ".join(f"{mode} mode: {reason}" for mode, reason in result.not_run.items())
        console.print(Text.assemble(("NOT RUN", "bold yellow"), f": nothing failed, but {not_run}"
                                    + (f"; {'; '.join(claims)}" if claims else "")), highlight=False)
        return
    console.print("[bold green]PASS[/]: " + "; ".join(claims), highlight=False)
