"""The equivalence check: is this TensorRT-LLM checkpoint exactly this HF model? And what does its dtype cost?

Stages, each recorded in the report with its time:
1. reassemble: the rank files' structure against the plan (files, tensors, shapes, dtypes), from their headers;
   the reassembled config compared with the source's;
2. forward, in one lock step over the source (`verify/lockstep.py`), a decoder layer at a time on the device
   (`verify/streaming.py`), each unit of the source read once and each unit of the rank files inverted once:
   - weights: every source tensor rebuilt from the rank files by the plan's inverse (replicas, padding, ties
     checked on the way) and compared with the source cast to the checkpoint dtype (bit-exact);
   - the source cast to the checkpoint dtype (with any op's declared rounding, e.g. a norm stored as 1 + weight)
     and the reassembled model, built from the reassembled config over those rebuilt tensors (nothing is written
     back), on the same token batches: identical weights and kernels give bit-identical logits;
   - the source in float32, for stage 3;
3. precision effect: the float32 source against the source in the checkpoint dtype, judged by documented
   thresholds (what the dtype costs, apart from any conversion fault);
4. localization, when anything differs: per-module outputs of both models, the first one that diverges.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, ClassVar, Iterator

import torch

from shardproof.converter.checkpoint import TRTCheckpoint, Violation
from shardproof.converter.dtypes import TORCH_DTYPES, dtype_name
from shardproof.converter.reassemble import reassembled_source
from shardproof.converter.source import Source, open_source
from shardproof.converter.target_checkpoint import open_checkpoint

from .forward import BatchOptions, first_divergence, first_nonfinite, hidden_states, logits_pass, model_logits
from .lockstep import CannotShare, run_passes
from .inputs import check_inputs
from .metrics import LogitMetrics, bit_identical, logit_metrics
from .outcomes import CheckOutcome, Status, judged, not_run, overall
from .rank_reads import RankReads
from .sharded_check import HFReference
from .thresholds import Check, UserLimits
from .streaming import Progress, ValueFn
from .weights import RebuiltUnits, WeightComparison, compare_weights

Log = Callable[[str], None]


CONFIG_FIELDS = (
    "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_parameters", "max_position_embeddings",
    "attention_bias", "mlp_bias", "tie_word_embeddings",
)
MODE = "reassembled"
CHECKS = ("reassembly", "config", "weights", "forward", "precision")


@dataclass
class ForwardComparison:
    """The source cast to the checkpoint dtype against the reassembled model: must be bit-identical. `metrics`
    size a difference (None when the logits are identical, or their shapes differ)."""

    identical: bool
    metrics: LogitMetrics | None
    differing_sequences: list[int]
    problem: str | None = None


@dataclass
class PrecisionEffect:
    """The float32 source against the source cast to the checkpoint dtype: what the cast costs. The checkpoint's
    logits are these bit for bit (the forward check), so this is the model's own cost of the dtype: reported, and
    judged only for non-finite logits (the dtype overflows) and against the user's own `limits`."""

    JSON_PROPERTIES: ClassVar[tuple[str, ...]] = ("ok", "checks")

    dtype: str
    metrics: LogitMetrics
    limits: UserLimits = UserLimits()
    first_nonfinite_module: str | None = None

    @property
    def checks(self) -> dict[str, Check]:
        return {"nonfinite": Check("nonfinite", self.metrics.nonfinite, "==", 0), **self.limits.checks(self.metrics)}

    @property
    def ok(self) -> bool:
        return all(c.passed for c in self.checks.values())


@dataclass
class Localization:
    """Where the two models first part (`module` None: no module output differs on `sequence`), and the differing
    weights of its decoder layer (or of the module itself outside the layers)."""

    sequence: int
    module: str | None
    max_abs_diff: float | None
    first_diff_index: tuple[int, ...] | None
    detail: str | None
    scope: str | None
    differing_tensors: list[str]


@dataclass
class EquivalenceReport:
    """Everything the check found; `passed` only when every check ran and passed."""

    JSON_PROPERTIES: ClassVar[tuple[str, ...]] = ("passed", "failures", "checks")

    model_dir: str
    checkpoint_dir: str
    architecture: str
    dtype: str
    tp_size: int
    pp_size: int
    device: str
    num_sequences: int
    seq_len: int
    seed: int
    violations: list[Violation] = field(default_factory=list)
    config_differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    weights: WeightComparison | None = None
    forward: ForwardComparison | None = None
    precision: PrecisionEffect | None = None
    localization: Localization | None = None
    timings: dict[str, float] = field(default_factory=dict, metadata={"json": "timings_s"})

    @property
    def checks(self) -> list[CheckOutcome]:
        """The outcome of each of CHECKS, in order."""
        v = self.violations
        outcomes = [judged(MODE, "reassembly", [f"{len(v)} reassembly violation(s)"] if v else [])]
        if self.weights is None:
            return outcomes + not_run(MODE, CHECKS[1:], "the checkpoint could not be rebuilt, so it was not compared")
        c, w = self.config_differences, self.weights
        outcomes.append(judged(MODE, "config", [f"{len(c)} config field(s) differ"] if c else []))
        differ = len(w.mismatches) + len(w.extra)
        outcomes.append(judged(MODE, "weights", [f"{differ} tensor(s) differ from the source"] if differ else []))
        f, p = self.forward, self.precision
        outcomes.append(judged(MODE, "forward", [] if f.identical else [f.problem or "logits are not bit-identical to the source's"]))
        failed = [name for name, check in p.checks.items() if not check.passed]
        outcomes.append(judged(MODE, "precision", [f"the cost of {self.dtype}: {'; '.join(str(p.checks[n]) for n in failed)}"] if failed else []))
        return outcomes

    @property
    def failures(self) -> list[str]:
        """One line per failed check."""
        return [o.reason for o in self.checks if o.status is Status.FAILED]

    @property
    def passed(self) -> bool:
        return overall(self.checks) is Status.PASSED


def _stopwatch(timings: dict[str, float], log: Log | None) -> Callable[[str, str], contextlib.AbstractContextManager]:
    """stage(name, message): logs `message`, then adds the block's wall time to timings[name]."""

    @contextlib.contextmanager
    def stage(name: str, message: str) -> Iterator[None]:
        if log:
            log(message)
        start = time.perf_counter()
        try:
            yield
        finally:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start

    return stage


def config_differences(source, rebuilt) -> list[str]:
    """The model-defining fields whose values differ between the source's and the reassembled model's HF configs."""
    missing = object()
    differences = []
    for name in CONFIG_FIELDS:
        a, b = getattr(source, name, missing), getattr(rebuilt, name, missing)
        if name == "rope_parameters" and a is not missing and b is not missing and same_rope(source, rebuilt):
            continue
        if a is not missing and a != b:
            differences.append(f"{name}: {a!r} in the source, {'absent' if b is missing else repr(b)} in the checkpoint")
    return differences


def same_rope(source, rebuilt) -> bool:
    """Whether transformers computes the same rotary tables (inverse frequencies and attention scaling) from both
    configs, at a short length and past every type's switch: a format that stores the rope in its own fields
    (longrope's factors and mscale) rebuilds an equivalent dict, not always the same keys."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    a, b = source.rope_parameters or {}, rebuilt.rope_parameters or {}
    kind = a.get("rope_type", "default")
    if kind != b.get("rope_type", "default") or kind not in ROPE_INIT_FUNCTIONS:
        return a == b
    init = ROPE_INIT_FUNCTIONS[kind]
    for seq_len in (None, 2 * source.max_position_embeddings):
        (fa, sa), (fb, sb) = init(source, None, seq_len=seq_len), init(rebuilt, None, seq_len=seq_len)
        if sa != sb or not torch.equal(fa, fb):
            return False
    return True


def sliding_window_note(config, seq_len: int) -> list[str]:
    """A TensorRT-LLM checkpoint does not store a sliding window (the runtime's max_attention_window_size does)."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return []
    effect = "shorter than the window" if seq_len <= window else "longer than the window, so the logits differ"
    return [
        f"the source attends within a sliding window of {window} tokens, which a TensorRT-LLM checkpoint does not "
        f"record: set max_attention_window_size={window} at runtime (sequences checked: {seq_len} tokens, {effect})"
    ]


def verify_equivalence(
    model_dir: Path | str, checkpoint_dir: Path | str, batch: BatchOptions = BatchOptions(), log: Log | None = None,
    target: str | None = None,
    progress: Progress | None = None,
    reference: HFReference | None = None,
    across: RankReads | None = None,
) -> EquivalenceReport:
    """Check that the checkpoint at `checkpoint_dir` is the HF model at `model_dir` (see the module docstring).

    Bad input (unreadable directories, a model transformers cannot load) raises ShardproofError; everything the
    checkpoint gets wrong is in the report. `log` receives a line as each stage starts; `progress` the bytes of
    source tensors read as the weights are compared and as each model streams through the device. `reference`:
    the source's runs another check shares (the sharded mode's, on the same tokens): this check's passes join
    whatever waits there, in one lock step, and take its float32 and reduced-precision runs where kept; `across`:
    the rank files' reads shared with that check's runtime (`verify/rank_reads.py`).
    """
    check_inputs(model_dir, checkpoint_dir, batch, target)
    dev, seq_len = batch.torch_device, batch.seq_len
    timings: dict[str, float] = {}
    stage = _stopwatch(timings, log)
    with stage("reassemble", "checking the rank files against the plan"):
        ckpt = open_checkpoint(checkpoint_dir, target, model_dir)
        violations = ckpt.structural_violations()
    mapping = ckpt.mapping
    report = EquivalenceReport(
        str(model_dir), str(checkpoint_dir), ckpt.card.name, ckpt.layout.dtype, mapping.tp_size,
        mapping.pp_size, str(dev), batch.num_sequences, seq_len, batch.seed, violations=violations,
        timings=timings,
    )
    if violations:
        return report
    with tempfile.TemporaryDirectory(prefix="shardproof-reassembled-") as tmp:
        source = open_source(model_dir)
        source_config = source.hf_config
        rebuilt = reassembled_source(ckpt, Path(tmp))
        rebuilt_config = rebuilt.hf_config
        report.config_differences = config_differences(source_config, rebuilt_config)
        report.notes = sliding_window_note(source_config, seq_len)
        rounded = [name for name in ckpt.plan.rounded_sources() if name in source.shapes]
        if rounded:
            report.notes.append(
                f"{len(rounded)} source tensor(s) go through an op that rounds in {report.dtype}; "
                "the source model is compared with that rounding applied"
            )
        vocab = min(source_config.vocab_size, rebuilt_config.vocab_size)  # tokens both models embed
        if reference is None or not torch.equal(reference.input_ids, batch.input_ids(vocab)):
            reference = HFReference(model_dir, batch, progress, target, vocab)
        runs = _Runs(source, rebuilt, ckpt, ckpt.plan.reassembled_value if rounded else None, batch, progress,
                     reference, across)
        _compare_models(report, runs, reference.input_ids, stage)
    return report


@dataclass(frozen=True)
class _Runs:
    """How this check runs the two models: streamed through the device (`verify/streaming.py`) under the batch's
    cap, the checkpoint's model inverted from the rank files as it runs (`rebuilt`);
    `rounded` sets the source's tensors to what reassembly must give back (None: the cast alone)."""

    source: Source
    rebuilt: Source
    checkpoint: TRTCheckpoint
    rounded: ValueFn | None
    batch: BatchOptions
    progress: Progress | None
    reference: HFReference
    across: RankReads | None

    def forward(self, dtype: torch.dtype, violations: list[Violation],
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, WeightComparison]:
        """On `reference`'s tokens: the source's logits in `dtype` with the checkpoint's rounding, in float32
        without it (None when that is the same run), the checkpoint's model's logits, and the weights comparison,
        in one lock step with whatever waits in `reference` (`verify/lockstep.py`): each unit of the source read
        once, each unit of the rank files inverted once for the comparison and the checkpoint's model
        (`RebuiltUnits`, whose findings are added to `violations`); the source's runs taken from `reference` where
        it keeps them.
        When they cannot share the reads (`CannotShare`: a checkpoint whose config makes another model, or a cap too
        small for a unit as stored beside a loaded one), the weights are compared first, a tensor pair at a time,
        and each model runs on its own."""
        dev, reference, name = self.batch.torch_device, self.reference, dtype_name(dtype)
        ids, got, found = reference.input_ids, {}, []
        units = RebuiltUnits(self.source, self.checkpoint, found, dev, self.across)
        reference.defer(replace(logits_pass(dtype, dev, ids), source=self.rebuilt, tensors=units),
                        lambda logits: got.__setitem__("actual", logits))
        if self.rounded is None:
            reference.want_native(name)
        else:
            reference.defer(logits_pass(dtype, dev, ids, self.rounded), lambda logits: got.__setitem__("expected", logits))
        separate = dtype != torch.float32 or self.rounded is not None  # the float32 run is another than the source's
        if separate:
            reference.want_logits(None)
        try:
            reference.run()
            weights = units.result()
        except CannotShare:
            found.clear()
            weights = compare_weights(self.source, self.checkpoint, found, self.progress, dev)
            got["actual"] = model_logits(self.rebuilt, dtype, dev, ids, None, self.batch.resident())
            if self.rounded is not None:
                got["expected"] = run_passes(self.source, [logits_pass(dtype, dev, ids, self.rounded)], dev,
                                             self.batch.resident(), self.progress)[0]
        violations += found
        expected = got["expected"] if self.rounded is not None else reference.native(name)
        return expected, reference.logits(None) if separate else None, got["actual"], weights

    def cost(self, dtype: str, expected: torch.Tensor, wide: torch.Tensor | None) -> LogitMetrics:
        """The float32 source's logits (`wide`; None: `expected` is float32) against `expected`: the model's own
        cost of `dtype` as `reference` keeps it (the sharded mode judges against the same) unless the conversion's
        rounding makes `expected` another run."""
        if self.rounded is None:
            return self.reference.own_cost(dtype).metrics
        return logit_metrics(expected if wide is None else wide, expected, dtype=dtype, device=self.batch.torch_device)

    def states(self, rebuilt: bool, dtype: torch.dtype, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        model, value = (self.rebuilt, None) if rebuilt else (self.source, self.rounded)
        return hidden_states(model, dtype, self.batch.torch_device, input_ids, value, self.batch.resident())


def _compare_models(report: EquivalenceReport, runs: _Runs, input_ids: torch.Tensor, stage: Callable) -> None:
    """Forward, precision and localization stages."""
    dtype, dev = TORCH_DTYPES[report.dtype], runs.batch.torch_device
    with stage("forward", f"rebuilding every tensor from the rank files, comparing it with the source, and running "
                          f"the source ({report.dtype}, and float32) and the checkpoint's model on {dev}"):
        expected, wide, actual, report.weights = runs.forward(dtype, report.violations)
        report.forward = _forward_comparison(expected, actual, dev)
    # The dtype's cost is measured on the source cast to it, so that a conversion fault shows in the forward
    # comparison alone; when the conversion is exact the checkpoint's logits are these, bit for bit.
    with stage("precision", f"measuring what {report.dtype} costs the source"):
        metrics = runs.cost(report.dtype, expected, wide)
        report.precision = PrecisionEffect(report.dtype, metrics, runs.batch.limits)
        if metrics.nonfinite:
            sequence = int((~torch.isfinite(expected)).flatten(1).any(dim=1).nonzero()[0])
            states = runs.states(False, dtype, input_ids[sequence : sequence + 1])
            report.precision.first_nonfinite_module = first_nonfinite(states)
    if not report.weights.ok or not report.forward.identical or report.config_differences:
        with stage("localization", "capturing per-module outputs of both models"):
            report.localization = _localize(report, runs, dtype, input_ids)


def _forward_comparison(expected: torch.Tensor, actual: torch.Tensor, device: torch.device) -> ForwardComparison:
    if expected.shape != actual.shape:
        problem = f"logits shapes differ: {list(actual.shape)} from the checkpoint, {list(expected.shape)} from the source"
        return ForwardComparison(False, None, list(range(expected.shape[0])), problem)
    differing = [i for i in range(expected.shape[0]) if not bit_identical(expected[i], actual[i])]
    return ForwardComparison(not differing, logit_metrics(expected, actual, device=device) if differing else None,
                             differing)


def _localize(report: EquivalenceReport, runs: _Runs, dtype: torch.dtype, input_ids: torch.Tensor) -> Localization:
    sequence = report.forward.differing_sequences[0] if report.forward.differing_sequences else 0
    ids = input_ids[sequence : sequence + 1]
    d = first_divergence(runs.states(False, dtype, ids), runs.states(True, dtype, ids))
    differing = [t.name for t in report.weights.mismatches]
    if d is None:
        return Localization(sequence, None, None, None, None, None, differing)
    scope = _scope(d.module)
    differing = [name for name in differing if name.startswith(scope + ".")]
    return Localization(sequence, d.module, d.max_abs_diff, d.first_diff_index, d.detail, scope, differing)


def _scope(module: str) -> str:
    """The decoder layer holding `module` (`model.layers.3`), or the module itself outside the layers."""
    match = re.match(r"(.*\.layers\.\d+)(\.|$)", module)
    return match.group(1) if match else module
