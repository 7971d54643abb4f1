"""`golden check` and `golden update`: regenerate every case's source model, convert it, compare with (or
rewrite) its committed manifest.

A card's manifests live in one directory (golden/manifests, or the card's `golden_dir`): the default target's at
its top, every other target's in a subfolder named after the target (`trtllm-pytorch/`)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from shardproof.converter.api import convert
from shardproof.converter.card import get_card, supported_architectures
from shardproof.converter.errors import ShardproofError
from shardproof.converter.plan import DEFAULT_TARGET
from shardproof.converter.target import get_target, targets, targets_for

from .cases import GoldenCase, cases_for
from .manifest import ConfigChange, Manifest, TensorChange, compare
from .source_model import write_source_model

MANIFESTS = Path(__file__).parent / "manifests"
Log = Callable[[str], None]


@dataclass
class CaseResult:
    """One case against its manifest: `status` is "same", "changed", "no manifest" or "error" (conversion failed)."""

    case: GoldenCase
    status: str
    tensors: list[TensorChange] = field(default_factory=list)
    config: list[ConfigChange] = field(default_factory=list)
    error: str | None = None
    manifest: Manifest | None = None

    @property
    def passed(self) -> bool:
        return self.status == "same"


@dataclass
class GoldenReport:
    results: list[CaseResult]
    removed: list[str] = field(default_factory=list)  # stale manifests `update` deleted

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if not r.passed]


def manifest_dir_for(architecture: str) -> Path:
    """Where an architecture's manifests live: its card's `golden_dir` (a plugin's package), else MANIFESTS."""
    return get_card(architecture).golden_dir or MANIFESTS


def manifest_path(case: GoldenCase, manifest_dir: Path | None = None) -> Path:
    """The case's manifest in `manifest_dir`, or (None) where its card keeps its manifests."""
    return (manifest_dir or manifest_dir_for(case.architecture)) / f"{case.name}.json"


def target_dir(manifest_dir: Path, target: str) -> Path:
    """Where a manifest directory keeps `target`'s manifests: its top for the default target, else a subfolder."""
    return manifest_dir if target == DEFAULT_TARGET else manifest_dir / target


def selected(architectures: Sequence[str] | None) -> list[str]:
    """The architectures asked for (each must be registered), default every registered one."""
    names = list(architectures or supported_architectures())
    for name in names:
        get_card(name)
    return names


def selected_cases(architectures: Sequence[str] | None, target_names: Sequence[str] | None) -> list[GoldenCase]:
    """Every case of `architectures` (default: every registered one) in `target_names` (default: every target each
    card supports). A named architecture that a named target does not support is bad input (ShardproofError);
    with no architecture named, a named target covers the cards that support it."""
    return [case for architecture in selected(architectures)
            for target in targets_for(get_card(architecture), target_names, strict=bool(architectures))
            for case in cases_for(architecture, target.name)]


def run_cases(architectures: Sequence[str] | None, manifest_dir: Path | None, log: Log | None = None,
              target_names: Sequence[str] | None = None) -> list[CaseResult]:
    """Regenerate and convert every case of `architectures` in `target_names` (`selected_cases`), and compare each
    with its manifest (in `manifest_dir`, or None: where each card keeps its manifests)."""
    results = []
    with tempfile.TemporaryDirectory(prefix="shardproof-golden-") as tmp:
        sources: dict[str, Path] = {}
        for case in selected_cases(architectures, target_names):
            if log:
                log(f"golden {case.name}")
            key = json.dumps([case.architecture, case.seed, case.overrides], sort_keys=True)
            if key not in sources:
                sources[key] = write_source_model(Path(tmp) / f"source{len(sources)}", case.architecture, case.seed,
                                                  **case.overrides)
            results.append(_compare_case(case, sources[key], Path(tmp) / f"checkpoint{len(results)}", manifest_dir))
    return results


def _compare_case(case: GoldenCase, source: Path, out: Path, manifest_dir: Path | None) -> CaseResult:
    try:
        convert(source, out, **case.layout, target=case.target)
    except ShardproofError as e:
        return CaseResult(case, "error", error=str(e).replace(str(source), "<source>"))
    described = dict(architecture=case.architecture, seed=case.seed, overrides=case.overrides)
    actual = Manifest.of_checkpoint(out, case.name, described, case.layout, get_target(case.target))
    path = manifest_path(case, manifest_dir)
    if not path.exists():
        return CaseResult(case, "no manifest", manifest=actual)
    tensors, config = compare(Manifest.load(path), actual)
    return CaseResult(case, "changed" if tensors or config else "same", tensors, config, manifest=actual)


def check(architectures: Sequence[str] | None = None, manifest_dir: Path | None = None, log: Log | None = None,
          target_names: Sequence[str] | None = None) -> GoldenReport:
    """Compare every case with its committed manifest; a missing manifest is a failure."""
    return GoldenReport(run_cases(architectures, manifest_dir, log, target_names))


def update(architectures: Sequence[str] | None = None, manifest_dir: Path | None = None, log: Log | None = None,
           target_names: Sequence[str] | None = None) -> GoldenReport:
    """Rewrite the manifest of every case that changed or has none; with every architecture, delete manifests no
    registered card's case produces from the directories of the targets written to. The report holds what changed
    before the rewrite. A case whose conversion fails keeps its manifest (and fails the report)."""
    results = run_cases(architectures, manifest_dir, log, target_names)
    for result in results:
        if result.status in ("changed", "no manifest"):
            path = manifest_path(result.case, manifest_dir)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(result.manifest.dumps())
    removed = []
    if not architectures:
        current = {manifest_path(r.case, manifest_dir) for r in results}
        bases = {manifest_dir or manifest_dir_for(name) for name in selected(None)}
        names = target_names or [t.name for t in targets()]
        for base in sorted(bases):
            for directory in sorted({target_dir(base, name) for name in names}):
                for stale in sorted(set(directory.glob("*.json")) - current):
                    stale.unlink()
                    removed.append(str(stale.relative_to(base)))
    return GoldenReport(results, removed)
