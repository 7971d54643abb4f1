"""`shardproof selftest`: inject every cataloged fault into a correct conversion and prove each mode catches it.

For every registered card (or the ones asked for) and each layout a mutant needs, the card's self-test model
(a tiny random model with every optional feature on) is built and converted correctly; the clean conversion
must pass both modes (sharded: `verify.sharded_check`; reassembled: `verify.equivalence`). Each mutant then
rewrites a copy of it and both modes run again. The self-test passes when every clean run passes, and the
sharded mode catches every applicable mutant and names the stage the mutant declares; what the reassembled
mode catches is reported alongside. A mutant with nothing of its kind to break in a card is listed as not
applicable there.
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from rich.table import Table

from shardproof.converter.api import convert
from shardproof.converter.card import get_card, supported_architectures
from shardproof.converter.errors import ShardproofError
from shardproof.converter.target import get_target

from .equivalence import EquivalenceReport, verify_equivalence
from .forward import BatchOptions
from .host_memory import libraries_frozen
from .mutations import Mutant, NotApplicable, Setup, catalog_for
from .serialize import to_json
from .sharded_check import CONVERSION_REL_ERROR, HFReference, ShardedReport, check_sharded
from .tiny_models import build_tiny_model

Log = Callable[[str], None]


def sharded_evidence(report: ShardedReport) -> str:
    """The deciding measurement of a sharded-mode report: the first failed check, else the conversion error."""
    if report.structural:
        return "structural: " + report.structural.replace(report.checkpoint_dir.rstrip("/") + "/", "")
    failed = [check for c in report.comparisons for check in c.failed_checks]
    return str(failed[0] if failed else report.comparison("conversion").checks["stage_relative_error"])


def sharded_located(report: ShardedReport) -> str | None:
    """Where the sharded mode places the fault: "structure", the first diverging stage, or None."""
    if report.structural:
        return "structure"
    return report.localization.first_diverging if report.localization else None


def reassembled_evidence(report: EquivalenceReport) -> str:
    """What the reassembled mode found first, most specific finding first."""
    if report.violations:
        v = report.violations[0]
        return f"{len(report.violations)} violation(s); rank {v.rank} {v.tensor}: {v.problem}"
    if report.weights is not None and report.weights.mismatches:
        first = report.weights.mismatches[0]
        diff = first.problem or f"max |diff| {first.max_abs_diff:.3g}"
        return f"{len(report.weights.mismatches)} tensor(s) not bit-exact; first {first.name} ({diff})"
    if report.config_differences:
        return f"config: {report.config_differences[0]}"
    if report.failures:
        return report.failures[0]
    return "weights and logits bit-exact, precision within thresholds"


@dataclass
class Outcome:
    """Both modes on one checkpoint: a clean conversion (mutant None) or a mutated one."""

    setup: Setup
    sharded: ShardedReport
    reassembled: EquivalenceReport
    mutant: Mutant | None = None

    @property
    def localized(self) -> bool:
        return self.mutant is None or sharded_located(self.sharded) == self.mutant.diverges_at

    @property
    def ok(self) -> bool:
        """Clean: both modes pass. Mutant: the sharded mode fails it and names the declared stage."""
        if self.mutant is None:
            return self.sharded.passed and self.reassembled.passed
        return not self.sharded.passed and self.localized

    def to_json(self) -> dict:
        precision = self.sharded.comparison("precision")
        return {
            "mutant": self.mutant.name if self.mutant else None,
            "fault": self.mutant.fault if self.mutant else None,
            "setup": str(self.setup),
            "ok": self.ok,
            "sharded": {**to_json(self.sharded), "evidence": sharded_evidence(self.sharded),
                        "located": sharded_located(self.sharded),
                        "expected_location": self.mutant.diverges_at if self.mutant else None,
                        "precision_alone_catches": None if precision is None else not precision.passed},
            "reassembled": {"passed": self.reassembled.passed, "failures": self.reassembled.failures,
                            "evidence": reassembled_evidence(self.reassembled)},
        }


@dataclass
class SelftestReport:
    """Every clean setup's and every mutant's outcome, and the mutants that could not run here."""

    clean: list[Outcome] = field(default_factory=list)
    mutants: list[Outcome] = field(default_factory=list)
    not_applicable: list[tuple[Mutant, Setup, str]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.ok for o in [*self.clean, *self.mutants])

    def margins(self) -> dict[str, float | None]:
        """The conversion check's worst-stage relative error: threshold over the largest clean value, smallest
        finite mutant value over the threshold (mutants caught structurally or through non-finite outputs have no
        finite value)."""
        clean = [_stage_error(o) for o in self.clean if not o.sharded.structural]
        caught = [_stage_error(o) for o in self.mutants if not o.sharded.structural]
        caught = [e for e in caught if math.isfinite(e)]
        return {
            "threshold": CONVERSION_REL_ERROR,
            "largest_clean": max(clean, default=None),
            "smallest_mutant": min(caught, default=None),
            "clean_margin": CONVERSION_REL_ERROR / max(clean) if clean and max(clean) > 0 else None,
            "mutant_margin": min(caught) / CONVERSION_REL_ERROR if caught else None,
        }

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "margins": self.margins(),
            "clean": [o.to_json() for o in self.clean],
            "mutants": [o.to_json() for o in self.mutants],
            "not_applicable": [{"mutant": m.name, "fault": m.fault, "setup": str(s), "reason": r}
                               for m, s, r in self.not_applicable],
        }


class _Workspace:
    """Source models, their HF references (rounded as `target` stores them) and clean conversions, each made once,
    under one directory."""

    def __init__(self, root: Path, batch: BatchOptions, log: Log | None, target: str):
        self.root, self.batch, self.log, self.target = root, batch, log, target
        self.models: dict[str, Path] = {}
        self.references: dict[Path, HFReference] = {}
        self.checkpoints: dict[Setup, Path | None] = {}  # None: the layout does not apply to the model

    def model(self, architecture: str) -> Path:
        if architecture not in self.models:
            from transformers.utils import logging

            logging.disable_progress_bar()
            overrides = get_card(architecture).tests.selftest
            directory = self.root / "models" / architecture
            self.models[architecture] = build_tiny_model(directory, architecture, seed=self.batch.seed, **overrides)
        return self.models[architecture]

    def reference(self, model_dir: Path) -> HFReference:
        if model_dir not in self.references:
            self.references[model_dir] = HFReference(model_dir, self.batch, target=self.target)
        return self.references[model_dir]

    def convert(self, model_dir: Path, setup: Setup, name: str, allow_nonfinite: bool = False) -> Path:
        out = self.root / "checkpoints" / name
        convert(model_dir, out, dtype=setup.dtype, tp_size=setup.tp_size, pp_size=setup.pp_size,
                allow_nonfinite=allow_nonfinite, target=setup.target)
        return out

    def check(self, setup: Setup, model_dir: Path, checkpoint_dir: Path, mutant: Mutant | None) -> Outcome:
        if self.log:
            self.log(f"{mutant.name if mutant else 'clean'} ({setup}): sharded and reassembled modes")
        reference = self.reference(model_dir)  # the source's runs, kept across setups and mutants
        sharded = check_sharded(checkpoint_dir, reference, setup.target)
        reassembled = verify_equivalence(model_dir, checkpoint_dir, self.batch, target=setup.target, reference=reference)
        return Outcome(setup, sharded, reassembled, mutant)


def _slug(setup: Setup) -> str:
    return re.sub(r"\W+", "-", str(setup))


def run_selftest(
    catalog: Sequence[Mutant] | None = None,
    architectures: Sequence[str] | None = None,
    batch: BatchOptions = BatchOptions(num_sequences=1),
    log: Log | None = None,
    target: str | None = None,
    models: Mapping[str, Path] | None = None,
) -> SelftestReport:
    """For each card (default: every registered one that `target` supports, or the architectures of `models`),
    check every clean setup the catalog needs, laid out in `target` (default: the TensorRT-LLM checkpoint), then
    inject every mutant and check again. The default catalog is every mutant that applies to the target
    (`mutations.catalog_for`). `models` maps an architecture to a source model directory to use instead of its
    card's self-test model (a trained model, say)."""
    target_ = get_target(target)
    catalog = catalog_for(target_.name) if catalog is None else catalog
    models = dict(models or {})
    architectures = list(architectures or models
                         or [a for a in supported_architectures() if target_.supports(get_card(a))])
    for name in architectures:
        target_.rows(get_card(name))  # an unknown architecture, or one the target refuses, is bad input
    report = SelftestReport()
    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(libraries_frozen())
        tmp = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="shardproof-selftest-"))
        ws = _Workspace(Path(tmp), batch, log, target_.name)
        ws.models.update(models)
        for architecture in architectures:
            for mutant in catalog:
                _inject(ws, report, mutant, mutant.layout.on(architecture, target_.name), Path(tmp))
    return report


def _inject(ws: _Workspace, report: SelftestReport, mutant: Mutant, setup: Setup, tmp: Path) -> None:
    """Convert the setup cleanly (once), inject `mutant` into a copy and record both modes' outcome."""
    model_dir = ws.model(setup.architecture)
    if setup not in ws.checkpoints:
        try:
            ws.checkpoints[setup] = ws.convert(model_dir, setup, _slug(setup))
        except ShardproofError as e:  # the self-test model cannot take this layout
            ws.checkpoints[setup] = None
            report.not_applicable.append((mutant, setup, f"the layout does not apply: {e}"))
            return
        report.clean.append(ws.check(setup, model_dir, ws.checkpoints[setup], None))
    if ws.checkpoints[setup] is None:
        report.not_applicable.append((mutant, setup, "the layout does not apply to this card's self-test model"))
        return
    slug = f"{mutant.name}-{_slug(setup)}"
    try:
        if mutant.target == "source":
            source_copy = Path(shutil.copytree(model_dir, tmp / "models" / slug))
            mutant.edit(source_copy, model_dir)
            # A source mutant (fp16-overflow) models a converter without the range check, which would refuse it:
            # allow_nonfinite converts it as such a converter does, so the verify modes must catch the inf.
            model_dir, mutated = source_copy, ws.convert(source_copy, setup, slug, allow_nonfinite=True)
        else:
            mutated = Path(shutil.copytree(ws.checkpoints[setup], tmp / "checkpoints" / slug))
            mutant.edit(mutated, model_dir)
    except NotApplicable as e:
        report.not_applicable.append((mutant, setup, str(e)))
        return
    report.mutants.append(ws.check(setup, model_dir, mutated, mutant))


CAUGHT, MISSED, PASS, FAIL = "[bold green]caught[/]", "[bold red]MISSED[/]", "[green]pass[/]", "[bold red]FAIL[/]"


def _precision_cell(report: ShardedReport) -> str:
    precision = report.comparison("precision")
    if precision is None:
        return "-"
    failed = precision.failed_checks
    return f"caught: {failed[0]}" if failed else f"missed (kl_mean {precision.metrics.kl_mean:.2g})"


def selftest_table(report: SelftestReport) -> Table:
    """One row per clean setup and per mutant: what each mode found, against which threshold."""
    table = Table(title="shardproof selftest: fault x mode", show_lines=True)
    for column in ("checkpoint", "sharded", "sharded: deciding check", "precision comparison alone",
                   "first diverging", "reassembled", "reassembled: first finding"):
        table.add_column(column, overflow="fold")
    for o in [*report.clean, *report.mutants]:
        if o.mutant is None:
            name, sharded = "clean", PASS if o.sharded.passed else FAIL
            reassembled = PASS if o.reassembled.passed else FAIL
        else:
            name, sharded = o.mutant.name, CAUGHT if not o.sharded.passed else MISSED
            reassembled = CAUGHT if not o.reassembled.passed else "[yellow]missed[/]"
        located = sharded_located(o.sharded) or "-"
        if not o.localized:
            located = f"[bold red]{located} (expected {o.mutant.diverges_at})[/]"
        table.add_row(f"{name}\n[dim]{o.setup}[/]", sharded, sharded_evidence(o.sharded), _precision_cell(o.sharded),
                      located, reassembled, reassembled_evidence(o.reassembled))
    for mutant, setup, reason in report.not_applicable:
        table.add_row(f"{mutant.name}\n[dim]{setup}[/]", "[dim]not applicable[/]", reason, "-", "-", "-", "-")
    return table


def _stage_error(outcome: Outcome) -> float:
    return outcome.sharded.comparison("conversion").checks["stage_relative_error"].value


def margins_line(report: SelftestReport) -> str:
    """The calibration margins of the conversion comparison, in one line."""
    m = report.margins()
    if m["largest_clean"] is None or m["smallest_mutant"] is None:
        return f"conversion check (worst stage's relative error) threshold {m['threshold']:g}"
    return (f"conversion check (worst stage's relative error) threshold {m['threshold']:g}: largest clean {m['largest_clean']:.2e} "
            f"(margin {m['clean_margin']:.0f}x), smallest mutant {m['smallest_mutant']:.2e} "
            f"(margin {m['mutant_margin']:.0f}x)")
