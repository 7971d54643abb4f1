"""The verdict over one checkpoint: the reassembled mode, the sharded mode, or both.

- reassembled: the rank files are inverted back into an HF checkpoint, compared with the source bit for bit,
  and run with transformers (verify/equivalence.py). It proves converter and reassembler are inverses.
- sharded: the rank files are run as TensorRT-LLM would run them (verify/runtime/) and compared
  with the HF original (verify/sharded_check.py). It catches a fault the converter and reassembler share.

Every check of a requested mode ends passed, failed, or not run: a mode that raises CheckNotRun (a valid
checkpoint using a feature it cannot execute yet) has all its checks not run, with the reason; the other still runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch

from shardproof.converter.errors import CheckNotRun, ShardproofError
from shardproof.converter.target_checkpoint import check_readable
from shardproof.converter.manifest import MANIFEST, ManifestCheck, check_manifest, source_differences

from .equivalence import CHECKS as REASSEMBLED_CHECKS, EquivalenceReport, verify_equivalence
from .forward import BatchOptions
from .inputs import check_model
from .host_memory import libraries_frozen, return_large_frees
from .outcomes import CheckOutcome, Status, judged, not_run, overall
from .rank_reads import RankReads
from .sharded_check import CHECKS as SHARDED_CHECKS, HFReference, ShardedReport, sharded_check, want_sharded
from .streaming import Progress

MODES = ("both", "reassembled", "sharded")
Log = Callable[[str], None]


@dataclass
class Verification:
    """The reports of the modes that ran, and why any requested mode did not run (mode -> reason)."""

    JSON_PROPERTIES: ClassVar[tuple[str, ...]] = ("status", "passed", "failures", "checks")

    mode: str
    reassembled: EquivalenceReport | None = None
    sharded: ShardedReport | None = None
    not_run: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict, metadata={"json": "timings_s"})
    manifest: list[CheckOutcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def checks(self) -> list[CheckOutcome]:
        """Every requested check: the manifest's (when there is one), then mode by mode: passed, failed or not run."""
        outcomes = list(self.manifest)
        for name, report, checks in (("reassembled", self.reassembled, REASSEMBLED_CHECKS),
                                     ("sharded", self.sharded, SHARDED_CHECKS)):
            if name in self.not_run:
                outcomes += not_run(name, checks, self.not_run[name])
            elif report is not None:
                outcomes += report.checks
        return outcomes

    @property
    def status(self) -> Status:
        """failed if any check failed, else not run if any check did not run, else passed."""
        return overall(self.checks)

    @property
    def failures(self) -> list[str]:
        return [str(o) for o in self.checks if o.status is Status.FAILED]

    @property
    def passed(self) -> bool:
        return self.status is Status.PASSED


def verify_checkpoint(
    model_dir: Path | str,
    checkpoint_dir: Path | str,
    mode: str = "both",
    batch: BatchOptions = BatchOptions(),
    log: Log | None = None,
    target: str | None = None,
    progress: Progress | None = None,
) -> Verification:
    """Run the chosen mode(s) on the same random token batches; bad input raises ShardproofError before any work.
    `target` names the layout of the rank files (converter/target.py; default the TensorRT-LLM checkpoint).

    Models stream through the device one layer at a time, under `batch.max_device_memory` when set; `progress`
    gets the bytes of source tensors read as they are compared and run.

    The checkpoint's integrity manifest is checked first: a missing, extra or resized file fails the verification
    with no mode run. The files' and the source's digests are then computed beside the modes (a second read of
    every byte, on other cores); a file whose digest differs fails the verification and the modes' reports are
    dropped (not run: they read a corrupted file), whatever they found or raised. A model directory that is not the
    checkpoint's source fails the `manifest source` check, but both modes still count, so the report also says
    whether the weights match. A checkpoint without a manifest (written by another tool) is verified all the same,
    with a note.
    """
    with libraries_frozen():
        return _verify(model_dir, checkpoint_dir, mode, batch, log, target, progress)


def _verify(model_dir: Path | str, checkpoint_dir: Path | str, mode: str, batch: BatchOptions, log: Log | None,
            target: str | None, progress: Progress | None) -> Verification:
    check_mode(mode)
    check_model(model_dir, batch)
    return_large_frees()
    result = Verification(mode)
    if log:
        log(f"checking the checkpoint's files against {MANIFEST}")
    start = time.perf_counter()
    files = check_manifest(Path(checkpoint_dir), contents=False)
    if not _manifest_outcomes(result, _Digests(files, seconds=time.perf_counter() - start)):
        return result
    with ThreadPoolExecutor(1, thread_name_prefix="shardproof-manifest") as pool:
        digests = pool.submit(contextvars.copy_context().run, _digests, model_dir, checkpoint_dir)  # --allow-pickle
        try:
            _run_modes(result, model_dir, checkpoint_dir, mode, batch, log, target, progress)
        except ShardproofError:
            if _manifest_outcomes(result, digests.result()):
                raise  # bad input, with every file as the manifest says
            return result
        _manifest_outcomes(result, digests.result())
    return result


@dataclass(frozen=True)
class _Digests:
    """The checkpoint's files against their digests; when they match, how the model directory differs from the
    source (one line per file), else None; the seconds it took."""

    files: ManifestCheck
    source_reason: list[str] | None = None
    seconds: float = 0.0


def _digests(model_dir: Path | str, checkpoint_dir: Path | str) -> _Digests:
    start = time.perf_counter()
    files = check_manifest(Path(checkpoint_dir))
    if files.manifest is None or not files.passed:
        return _Digests(files, None, time.perf_counter() - start)
    differences = source_differences(files.manifest, Path(model_dir))
    reason = [f"{model_dir} is not the model the checkpoint was converted from ({'; '.join(differences)})"]
    return _Digests(files, reason if differences else [], time.perf_counter() - start)


def _manifest_outcomes(result: Verification, digests: _Digests) -> bool:
    """Record the manifest's checks in `result` (replacing earlier ones); False, with the requested modes not run
    and any report of theirs dropped, when a file differs from it."""
    files = digests.files
    result.notes = [files.summary()]
    result.manifest = []
    if files.manifest is not None and (digests.source_reason is not None or not files.passed):
        result.manifest.append(judged("manifest", "files", [] if files.passed else [files.summary()]))
    if digests.source_reason is not None:
        result.manifest.append(judged("manifest", "source", digests.source_reason))
    result.timings["manifest"] = digests.seconds  # the digests' own time, beside the modes'
    if files.passed:
        return True
    result.reassembled = result.sharded = None
    for name in ("reassembled", "sharded"):
        if result.mode in ("both", name):
            result.not_run[name] = f"the checkpoint's files differ from {MANIFEST}"
    return False


def _run_modes(result: Verification, model_dir: Path | str, checkpoint_dir: Path | str, mode: str,
               batch: BatchOptions, log: Log | None, target: str | None, progress: Progress | None) -> None:
    check_readable(checkpoint_dir, target, model_dir)
    batch.limit_device_memory()
    if mode == "both" and _together(result, model_dir, checkpoint_dir, batch, log, target, progress):
        return
    if mode in ("both", "reassembled"):
        with _unless_not_run(result, "reassembled"):
            result.reassembled = verify_equivalence(model_dir, checkpoint_dir, batch, log, target, progress)
            result.timings.update(result.reassembled.timings)
    if mode in ("both", "sharded"):
        if log:
            log("running the rank files with the sharded reference runtime")
        start = time.perf_counter()
        with _unless_not_run(result, "sharded"):
            result.sharded = sharded_check(model_dir, checkpoint_dir, batch, target, progress)
        result.timings["sharded"] = time.perf_counter() - start


def _together(result: Verification, model_dir: Path | str, checkpoint_dir: Path | str, batch: BatchOptions,
              log: Log | None, target: str | None, progress: Progress | None) -> bool:
    """Both modes over one lock step of the source: the sharded mode's runs (teacher-forced, float32, the model's
    own in the checkpoint dtype) wait in one `HFReference`, the reassembled mode's join them (its rebuilt model
    and weights comparison) and take the float32 and reduced-precision runs they share, so each unit of the source
    is read once for both, and each tensor of the rank files once for the runtime and the rebuilt model
    (`RankReads`). True when both ran (passed or failed); False, with nothing recorded, when either could
    not (a check not run, the device out of memory): then each runs on its own, so the right one is reported."""
    reports = _shared(model_dir, checkpoint_dir, batch, log, target, progress)
    if reports is None:
        # What the failed step held on the device is in reference cycles (its runs' closures, the traceback's
        # frames): freed now, or the modes run apart beside it (a quarter-model cap at 8B ran out of memory so).
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return False
    result.reassembled, result.sharded, sharded_seconds = reports
    result.timings.update(result.reassembled.timings)
    result.timings["sharded"] = sharded_seconds
    return True


def _shared(model_dir: Path | str, checkpoint_dir: Path | str, batch: BatchOptions, log: Log | None,
            target: str | None, progress: Progress | None
            ) -> tuple[EquivalenceReport, ShardedReport, float] | None:
    """`_together`'s lock step: both modes' reports and the seconds of the sharded mode's own work (its runs are
    in the reassembled mode's "forward"), or None when either could not run."""
    reference, across = HFReference(model_dir, batch, progress, target), RankReads()
    try:
        sharded = want_sharded(checkpoint_dir, reference, target, across)
        if log:
            log("the sharded reference runtime runs the rank files in step with the reassembled mode's runs")
        reassembled = verify_equivalence(model_dir, checkpoint_dir, batch, log, target, progress, reference, across)
        start = time.perf_counter()
        return reassembled, sharded(), time.perf_counter() - start
    except (CheckNotRun, torch.OutOfMemoryError):
        return None


def convert_and_check(
    model_dir: Path | str,
    output_dir: Path | str | None = None,
    mode: str = "both",
    batch: BatchOptions = BatchOptions(),
    overwrite: bool = False,
    log: Log | None = None,
    progress: Progress | None = None,
    **layout: Any,
) -> Verification:
    """Convert `model_dir` (into `output_dir`, or a temporary directory removed afterwards), then verify it.

    `layout` holds `shardproof.converter.api.convert`'s keyword arguments (dtype, tp_size, pp_size, ...);
    `progress` gets the bytes written by the conversion, then those read by the verification.
    """
    from shardproof.converter.api import convert

    check_mode(mode)  # before the conversion, not after it
    check_model(model_dir, batch)
    with _output(output_dir) as out:
        if log:
            log(f"converting {model_dir} ({', '.join(f'{k}={v}' for k, v in layout.items())})")
        start = time.perf_counter()
        convert(model_dir, out, overwrite=overwrite, note=log, progress=(lambda name, nbytes: progress(nbytes)) if progress else None,
                **layout)
        elapsed = time.perf_counter() - start
        result = verify_checkpoint(model_dir, out, mode, batch, log, layout.get("target"), progress)
    result.timings = {"convert": elapsed, **result.timings}
    return result


def check_mode(mode: str) -> None:
    """ShardproofError unless `mode` is one of MODES."""
    if mode not in MODES:
        raise ShardproofError(f"--mode {mode!r} is not one of {', '.join(MODES)}")


@contextlib.contextmanager
def _unless_not_run(result: Verification, mode: str) -> Iterator[None]:
    """Record CheckNotRun from the block as the reason `mode` did not run; so is the device running out of memory
    (under --max-device-memory, or on a device too small): the check could not run, it did not fail."""
    try:
        yield
    except CheckNotRun as e:
        result.not_run[mode] = str(e)
    except torch.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        result.not_run[mode] = f"the device ran out of memory ({str(e).splitlines()[0]})"


@contextlib.contextmanager
def _output(output_dir: Path | str | None) -> Iterator[Path]:
    if output_dir is not None:
        yield Path(output_dir)
        return
    with tempfile.TemporaryDirectory(prefix="shardproof-check-") as tmp:
        yield Path(tmp) / "checkpoint"
