"""The sharded-mode check: the checkpoint executed as TensorRT-LLM would, against the HF original.

Round-tripping (`verify.equivalence`) proves the converter and the reassembler are inverses; it cannot see a
fault the two share. Here `verify.runtime` runs the rank files, reading only config.json and the
shards, and its logits are compared with HF's own forward pass of the source model on the same token batches:

* conversion: both sides compute in float32 over the same values: the checkpoint's, and HF's parameters set
  to what a correct conversion stores for them, read back (the cast, and an op's rounding such as
  a norm stored as 1 + weight). Only float32 summation order separates them, so the relative error
  (max |diff| / max |reference output|) of every stage, run teacher-forced (below), must stay below
  CONVERSION_REL_ERROR; the logits' own relative error is reported (it compounds every layer's rounding, so
  its margin shrinks with depth: 3e-5 at 80 layers of an 8B model's width, against 3e-6 for any one stage). This
  isolates conversion faults from precision loss, which is what makes subtle faults visible in a float16 or
  bfloat16 checkpoint.
* precision (float16 / bfloat16 only): the runtime computing in the checkpoint dtype against HF in float32
  over the original weights: the dtype's cost as deployed, judged against the model's own cost of that dtype
  (HF loaded in it, same tokens; verify/dtype_cost.py): at most COST_FACTOR x, and within the user's limits.

Teacher-forced, in float32 over stored values: each stage (embedding, every decoder layer, final norm + lm_head)
runs on HF's own input to it, during HF's run, and its output is compared with HF's: per-stage relative errors
that do not include any earlier stage's (the conversion check's verdict), and the first stage beyond
CONVERSION_REL_ERROR.
The runtime's own runs (in float32 and in the checkpoint dtype) step through the stages with the teacher-forced
ones (`runtime/teacher.py`), so one pass over the rank files serves all three.
On failure the first diverging stage (embedding, decoder layer, final norm + lm_head) is named.
docs/selftest.md says how the thresholds were calibrated against the mutation self-test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Hashable

import torch
from torch import Tensor

from shardproof.converter.api import plan_conversion
from shardproof.converter.dtypes import TORCH_DTYPES, dtype_name
from shardproof.converter.source import open_source

from .forward import BatchOptions, logits_pass
from .lockstep import CannotShare, Pass, run_passes
from .metrics import LogitMetrics, logit_metrics
from .outcomes import CheckOutcome, Status, judged, not_run, overall
from .rank_reads import RankReads
from .runtime.collectives import SimulatedCollectives
from .runtime.rank_files import ShardedCheckpoint
from .runtime.target_view import open_sharded
from .runtime.simulated import run_simulated
from .runtime.teacher import StageRunner
from .streaming import Progress, decoder_layers
from .dtype_cost import COST_FACTOR, OwnCost, judge_cost
from .thresholds import Check, UserLimits, checks_by_metric

# float32 on both sides over identical values; calibrated in docs/selftest.md (clean <= 5.8e-6, faults >= 6.6e-3).
CONVERSION_REL_ERROR = 1e-4
FINAL_STAGE = "final norm + lm_head"


MODE = "sharded"
CHECKS = ("conversion", "precision")


@dataclass
class LogitComparison:
    """Candidate logits (the runtime) against reference logits (HF), with the checks that judge them, by metric."""

    JSON_PROPERTIES: ClassVar[tuple[str, ...]] = ("passed",)

    name: str
    reference: str
    candidate: str
    metrics: LogitMetrics
    relative_error: float
    checks: dict[str, Check]
    own: LogitMetrics | None = None  # precision: the model's own cost of the dtype (HF float32 vs HF in it)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks.values())

    @property
    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks.values() if not c.passed]


@dataclass(frozen=True)
class StageError:
    stage: str
    relative_error: float


@dataclass
class Localization:
    """Per-stage relative error of one sequence and the first stage that diverges."""

    comparison: str
    sequence: int
    criterion: str
    stages: list[StageError]
    first_diverging: str | None


@dataclass
class TeacherForced:
    """Each stage run by the runtime on HF's input to it (float32, stored values), against HF's output: its own
    relative error, and the first stage beyond CONVERSION_REL_ERROR or not finite where HF is."""

    stages: list[StageError]
    first_beyond: str | None
    criterion: str = f"relative error > {CONVERSION_REL_ERROR:g} or non-finite"

    @property
    def worst(self) -> StageError:
        """The stage with the largest relative error (a NaN one first: NaN fails every check)."""
        return max(self.stages, key=lambda e: (math.isnan(e.relative_error), e.relative_error))


@dataclass
class ShardedReport:
    """Everything the sharded-mode check found; `passed` only when every check ran and passed."""

    JSON_PROPERTIES: ClassVar[tuple[str, ...]] = ("passed", "failures", "checks")

    model_dir: str
    checkpoint_dir: str
    num_sequences: int
    seq_len: int
    seed: int
    device: str
    dtype: str | None = None
    tp_size: int | None = None
    pp_size: int | None = None
    structural: str | None = None
    comparisons: list[LogitComparison] = field(default_factory=list)
    teacher_forced: TeacherForced | None = None
    localization: Localization | None = None

    def comparison(self, name: str) -> LogitComparison | None:
        return next((c for c in self.comparisons if c.name == name), None)

    @property
    def checks(self) -> list[CheckOutcome]:
        """conversion, then precision unless the checkpoint is float32 (its math is the conversion comparison's)."""
        names = CHECKS[:1] if self.dtype == "float32" else CHECKS
        if self.structural:
            rejected = f"the runtime rejects the checkpoint: {self.structural}"
            return [judged(MODE, "conversion", [rejected]), *not_run(MODE, names[1:], rejected)]
        return [judged(MODE, name, [f"{name}: {check}" for check in self.comparison(name).failed_checks])
                for name in names]

    @property
    def failures(self) -> list[str]:
        """One line per failed check."""
        return [o.reason for o in self.checks if o.status is Status.FAILED]

    @property
    def passed(self) -> bool:
        return overall(self.checks) is Status.PASSED


class HFReference:
    """The HF model at `model_dir` on one batch of random tokens (drawn from `vocab_size`, default the source's),
    its runs computed once and kept.

    `logits(rounding)` runs in float32: `rounding` None runs the original weights; a dtype name sets every
    parameter to what a correct conversion to that dtype, laid out in `target` (default: the TensorRT-LLM
    checkpoint), stores for it, read back (`Plan.reassembled_value`: a target may store a tensor in another dtype),
    as each source tensor is read. `native(dtype)` is HF loaded in that dtype (its own cost of it). The model
    streams through the device one decoder layer at a time (`verify/streaming.py`) under the batch's cap;
    `progress` gets the bytes of source tensors read.

    Runs asked for (`want_logits`, `want_native`, `want_teacher`, and other checks' passes given to `defer`: the
    reassembled mode's) wait for the next `run`, which runs them all in one lock step, each unit of the source read
    once for all (`verify/lockstep.py`); asking for a result runs what waits.
    """

    def __init__(self, model_dir: Path | str, batch: BatchOptions = BatchOptions(num_sequences=2),
                 progress: Progress | None = None, target: str | None = None, vocab_size: int | None = None) -> None:
        self.model_dir, self.seed, self.device, self.target = Path(model_dir), batch.seed, batch.torch_device, target
        self.batch, self.progress = batch, progress
        self.vocab_size = open_source(model_dir).hf_config.vocab_size
        self.input_ids = batch.input_ids(vocab_size or self.vocab_size)
        self._runs: dict[tuple[str | None, int | None], tuple[Tensor, list[Tensor]]] = {}
        self._native: dict[str, Tensor] = {}
        self._own: dict[str, OwnCost] = {}
        # what waits for the next `run`: its key (None: another check's, `defer`), the pass, what takes its result
        self._waiting: list[tuple[Hashable | None, Pass, Callable[[Any], None]]] = []

    def logits(self, rounding: str | None) -> Tensor:
        """float32 logits [num_sequences, seq_len, vocab] on the CPU."""
        self.want_logits(rounding)
        self.run()
        return self._runs[(rounding, None)][0]

    def native(self, dtype: str) -> Tensor:
        """HF's logits loaded in `dtype`, on the CPU (float32: `logits(None)`)."""
        if dtype == "float32":
            return self.logits(None)
        self.want_native(dtype)
        self.run()
        return self._native[dtype]

    def stages(self, rounding: str | None, sequence: int) -> tuple[Tensor, list[Tensor]]:
        """Logits and the float32 outputs [embedding, layer 0, ...] of one sequence."""
        key = (rounding, sequence)
        if key not in self._runs:
            self._wait(key, self._pass(rounding, sequence), lambda run: self._runs.__setitem__(key, run))
            self.run()
        return self._runs[key]

    def own_cost(self, dtype: str) -> OwnCost:
        """The model's own cost of `dtype`: HF loaded in it against HF float32 (`verify/dtype_cost.py`)."""
        if dtype not in self._own:
            self.want_logits(None)
            self.want_native(dtype)
            self._own[dtype] = OwnCost.measured(dtype, self.logits(None), self.native(dtype), self.device)
        return self._own[dtype]

    def want_logits(self, rounding: str | None) -> None:
        """`logits(rounding)` runs with the next `run`, unless kept already."""
        key = (rounding, None)
        if key not in self._runs:
            self._wait(key, self._pass(rounding, None), lambda run: self._runs.__setitem__(key, run))

    def want_native(self, dtype: str) -> None:
        """`native(dtype)` runs with the next `run`, unless kept already (float32: the original run)."""
        if dtype == "float32":
            self.want_logits(None)
        elif dtype not in self._native:
            self._wait(("native", dtype), logits_pass(TORCH_DTYPES[dtype], self.device, self.input_ids),
                       lambda logits: self._native.__setitem__(dtype, logits))

    def defer(self, run: Pass, done: Callable[[Any], None]) -> None:
        """Another check's pass over this source, on these tokens, to run with the next `run`: `done` gets its
        result."""
        self._waiting.append((None, run, done))

    def run(self) -> None:
        """Everything waiting, in one lock step (nothing when nothing waits). A failure drops it all, to be asked
        for again, except `CannotShare`, raised before any pass ran: this reference's own runs wait on, the passes
        of other checks are dropped (their checks run them apart)."""
        waiting, self._waiting = self._waiting, []
        if not waiting:
            return
        try:
            results = run_passes(self.model_dir, [p for _, p, _ in waiting], self.device, self.batch.resident(),
                                 self.progress)
        except CannotShare:
            self._waiting = [w for w in waiting if w[0] is not None]
            raise
        for (_, _, done), result in zip(waiting, results):
            done(result)

    def want_teacher(self, rounding: str, runtime: StageRunner) -> Callable[[], TeacherForced]:
        """HF's run with `rounding` (its logits kept as `logits(rounding)`), each of `runtime`'s stages run on
        HF's input to that stage as HF runs (its free runs advancing with it), and compared with HF's output, to
        run with the next `run`, with HF's original run and its run in `rounding`'s dtype (`own_cost`) unless kept
        already. The function returned gives the comparison, running what waits first."""
        errors: list[StageError] = []
        last: list[Tensor] = []

        def compare(label: str, reference: Tensor, candidate: Tensor) -> None:
            broken = bool((~torch.isfinite(candidate) & torch.isfinite(reference)).any())
            errors.append(StageError(label, math.inf if broken else relative_error(reference, candidate)))

        def hooks(model: torch.nn.Module) -> list:
            layers, inputs = decoder_layers(model), {}

            def before(index: int):
                def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                    inputs[index] = (args[0] if args else kwargs["hidden_states"]).float()
                    if index == 0:
                        compare("embedding", inputs[0], runtime.embed().float())
                return hook

            def after(index: int):
                def hook(module: torch.nn.Module, args: object, output: object) -> None:
                    out = (output if isinstance(output, Tensor) else output[0]).float()
                    compare(f"layer {index}", out, runtime.layer(index, inputs.pop(index)).float())
                    last[:] = [out]
                return hook

            return [h for i, layer in enumerate(layers) for h in (
                layer.register_forward_pre_hook(before(i), with_kwargs=True), layer.register_forward_hook(after(i)))]

        key = (rounding, None)
        self._runs.pop(key, None)  # this run's logits replace any kept: the stages are compared on them
        self._wait(("teacher", id(runtime)), self._pass(rounding, None, hooks), lambda run: self._runs.__setitem__(key, run))
        if rounding != "float32":
            self.want_logits(None)
            self.want_native(rounding)

        def forced() -> TeacherForced:
            self.run()
            if not last:
                raise AssertionError("the teacher-forced run did not run")
            logits = self._runs[key][0]
            compare(FINAL_STAGE, logits.to(self.device), runtime.logits(last[0]).float())
            last.clear()
            first = next((e.stage for e in errors if not e.relative_error <= CONVERSION_REL_ERROR), None)
            return TeacherForced(errors, first)

        return forced

    def teacher_forced(self, rounding: str, runtime: StageRunner) -> TeacherForced:
        """`want_teacher`'s comparison, run now."""
        return self.want_teacher(rounding, runtime)()

    def _wait(self, key: Hashable | None, run: Pass, done: Callable[[Any], None]) -> None:
        if all(k != key for k, _, _ in self._waiting):
            self._waiting.append((key, run, done))

    def _pass(self, rounding: str | None, sequence: int | None,
              hooks: Callable[[torch.nn.Module], list] | None = None) -> Pass[tuple[Tensor, list[Tensor]]]:
        """The float32 run with `rounding` on every sequence or one (capturing its stages), `hooks(model)` adding
        hooks of its own for the run (returning their handles)."""
        ids = self.input_ids if sequence is None else self.input_ids[sequence : sequence + 1]
        value = plan_conversion(self.model_dir, dtype=rounding, target=self.target)[0].reassembled_value if rounding else None

        def run(model: torch.nn.Module) -> tuple[Tensor, list[Tensor]]:
            handles = hooks(model) if hooks else []
            try:
                return _forward(model, ids.to(self.device), capture=sequence is not None)
            finally:
                for handle in handles:
                    handle.remove()

        return Pass(torch.float32, run, value)


def _forward(model: torch.nn.Module, ids: Tensor, capture: bool) -> tuple[Tensor, list[Tensor]]:
    """Logits and, with `capture`, the embedding (what enters the first decoder layer: token embedding, scaled or
    with positions added as the family does) and every decoder layer's outputs, float32 on the CPU."""
    outputs: list[Tensor] = []

    def keep(module: torch.nn.Module, inputs: object, output: object) -> None:
        tensor = output if isinstance(output, Tensor) else output[0]
        outputs.append(tensor.detach().float().cpu())

    def keep_input(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        outputs.append((args[0] if args else kwargs["hidden_states"]).detach().float().cpu())

    layers = decoder_layers(model) if capture else []
    handles = [m.register_forward_hook(keep) for m in layers]
    if capture:
        handles.append(layers[0].register_forward_pre_hook(keep_input, with_kwargs=True))
    try:
        with torch.inference_mode():
            logits = model(input_ids=ids, use_cache=False).logits.float().cpu()
    finally:
        for handle in handles:
            handle.remove()
    return logits, outputs


def relative_error(reference: Tensor, candidate: Tensor, device: torch.device | None = None) -> float:
    """max |candidate - reference| / max |reference|, computed on `device` (default: the reference's); NaN or inf
    when either side is not finite."""
    reference, candidate = reference.to(device).double(), candidate.to(device).double()
    return float((candidate - reference).abs().max() / reference.abs().max())


def _conversion(dtype: str, ref: Tensor, cand: Tensor, forced: TeacherForced, device: torch.device) -> LogitComparison:
    """The runtime in float32 over the stored values against HF in float32 over the same values: judged stage by
    stage (`forced`), each stage's error its own; the logits' relative error, which compounds the float32
    rounding of every layer before it (3e-5 at 80 layers of an 8B model's width), is reported."""
    metrics, error = logit_metrics(ref, cand, device=device), relative_error(ref, cand, device)
    worst = forced.worst
    checks = checks_by_metric(Check("reference_nonfinite", int((~torch.isfinite(ref)).sum()), "==", 0),
                              Check("nonfinite", metrics.nonfinite, "==", 0),
                              Check("stage_relative_error", worst.relative_error, "<=", CONVERSION_REL_ERROR,
                                    f"largest at {worst.stage}"))
    return LogitComparison("conversion", f"HF, weights as stored in {dtype}, float32 math", "runtime, float32 math",
                           metrics, error, checks)


def _precision(dtype: str, ref: Tensor, cand: Tensor, own: OwnCost, limits: UserLimits,
               device: torch.device) -> LogitComparison:
    """The runtime in the checkpoint dtype against HF float32: its cost, judged against COST_FACTOR x the model's
    own cost of the dtype and the user's limits."""
    metrics = logit_metrics(ref, cand, dtype=dtype, device=device)
    checks = {**judge_cost(metrics, own, COST_FACTOR), **limits.checks(metrics)}
    return LogitComparison("precision", "HF float32", f"runtime, {dtype} math", metrics, relative_error(ref, cand, device),
                           checks, own.metrics)


def check_sharded(checkpoint_dir: Path | str, reference: HFReference, target: str | None = None) -> ShardedReport:
    """Run the checkpoint with the sharded runtime on `reference`'s tokens and compare (module docstring).

    A checkpoint the runtime rejects (missing, extra or misshapen tensors, a bad config) fails as structural;
    one using a feature the runtime cannot execute raises `CheckNotRun` (the check did not run).
    """
    return want_sharded(checkpoint_dir, reference, target)()


def want_sharded(checkpoint_dir: Path | str, reference: HFReference, target: str | None = None,
                 across: RankReads | None = None) -> Callable[[], ShardedReport]:
    """`check_sharded` in two steps: the checkpoint opened, and its runs asked of `reference` (to run with its
    next `run`, beside what other checks ask of it; `across`: the rank files' reads shared with another reader of
    them, `verify/rank_reads.py`); then the function returned runs what waits and gives the report."""
    ids = reference.input_ids
    report = ShardedReport(str(reference.model_dir), str(checkpoint_dir), ids.shape[0], ids.shape[1],
                           reference.seed, str(reference.device))
    try:
        ckpt = open_sharded(checkpoint_dir, target, reference.model_dir)
        ckpt.validate()
    except ValueError as e:
        report.structural = str(e)
        return lambda: report
    cfg = ckpt.config
    report.dtype, report.tp_size, report.pp_size = dtype_name(cfg.dtype), cfg.tp_size, cfg.pp_size
    if cfg.vocab_size != reference.vocab_size:
        report.structural = f"vocab_size is {cfg.vocab_size} in config.json, {reference.vocab_size} in the source"
        return lambda: report
    dtype, device = report.dtype, reference.device
    # one pass over the rank files: the teacher-forced stages, the runtime in the checkpoint dtype and in float32
    free = (cfg.dtype,) if dtype == "float32" else (cfg.dtype, torch.float32)
    runner = StageRunner(ckpt, device, torch.float32, ids, free, across)
    forced = reference.want_teacher(dtype, runner)

    def finish() -> ShardedReport:
        report.teacher_forced = forced()
        native, wide = (runner.free_logits[0].cpu(),) * 2 if dtype == "float32" else (t.cpu() for t in runner.free_logits)
        conversion = _conversion(dtype, reference.logits(dtype), wide, report.teacher_forced, device)
        report.comparisons.append(conversion)
        if dtype != "float32":
            report.comparisons.append(_precision(dtype, reference.logits(None), native, reference.own_cost(dtype),
                                                 reference.batch.limits, device))
        if report.passed:
            return report
        # Stage by stage in float32 over stored values, unless the reference itself is not finite (the source does
        # not survive the cast): then in the checkpoint dtype against HF float32, looking for the first inf or NaN.
        if not conversion.passed and conversion.checks["reference_nonfinite"].passed:
            report.localization = _localize(ckpt, reference, "conversion", dtype, torch.float32, wide)
        else:
            report.localization = _localize(ckpt, reference, "precision", None, cfg.dtype, native)
        return report

    return finish


def _localize(ckpt: ShardedCheckpoint, reference: HFReference, name: str, rounding: str | None,
              compute: torch.dtype, logits: Tensor) -> Localization:
    """Compare the stage outputs of the sequence whose logits differ most from `reference.logits(rounding)`."""
    exact = name == "conversion"
    per_sequence = (logits - reference.logits(rounding)).abs().nan_to_num(nan=math.inf).flatten(1).amax(dim=1)
    sequence = int(per_sequence.argmax())
    ids = reference.input_ids[sequence : sequence + 1].to(reference.device)
    ref_out, ref_stages = reference.stages(rounding, sequence)
    cand_out, cand_stages = _runtime_stages(ckpt, ids, compute)
    labels = ["embedding", *(f"layer {i}" for i in range(len(ref_stages) - 1)), FINAL_STAGE]
    stages, first = [], None
    for label, ref, cand in zip(labels, [*ref_stages, ref_out], [*cand_stages, cand_out]):
        error = relative_error(ref, cand)
        stages.append(StageError(label, error))
        broken = bool((~torch.isfinite(cand) & torch.isfinite(ref)).any())
        if first is None and (broken or (exact and not error <= CONVERSION_REL_ERROR)):
            first = label
    criterion = (f"relative error > {CONVERSION_REL_ERROR:g} or non-finite" if exact
                 else "non-finite where HF float32 is finite")
    return Localization(name, sequence, criterion, stages, first)


def _runtime_stages(ckpt: ShardedCheckpoint, ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, list[Tensor]]:
    """The runtime's logits and float32 outputs [embedding, layer 0, ...] for `ids`, computing in `dtype`."""
    cfg = ckpt.config
    first_stage = [ckpt.weights(t, ids.device, dtype) for t in range(cfg.tp_size)]
    embedding = ckpt.family.embed(ids, first_stage, cfg, SimulatedCollectives())[0].float().cpu()
    logits, hidden = run_simulated(ckpt, ids, ids.device, dtype, return_hidden=True)
    return logits.cpu(), [embedding, *(h.cpu() for h in hidden)]


def sharded_check(model_dir: Path | str, checkpoint_dir: Path | str,
                  batch: BatchOptions = BatchOptions(num_sequences=2), target: str | None = None,
                  progress: Progress | None = None) -> ShardedReport:
    """Check the rank files at `checkpoint_dir` (laid out in `target`, default the TensorRT-LLM checkpoint) against
    the HF model at `model_dir` on random token batches."""
    return check_sharded(checkpoint_dir, HFReference(model_dir, batch, progress, target), target)
