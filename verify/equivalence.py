"""The equivalence check: is this TensorRT-LLM checkpoint exactly this HF model? And what does its dtype cost?

Stages, each recorded in the report with its time:
1. reassemble the rank files (replicas, padding, completeness checked on the way) into a temporary HF model;
2. compare its config with the source's and every tensor with the source cast to the checkpoint dtype (bit-exact);
3. forward: the source cast to the checkpoint dtype (with any op's declared rounding, e.g. a norm
   stored as 1 + weight) and the reassembled model on the same token batches, one after the other on the device;
   identical weights and kernels give bit-identical logits;
4. precision effect: the float32 source against the source in the checkpoint dtype, judged by documented
   thresholds (what the dtype costs, apart from any conversion fault);
5. localization, when anything differs: per-module outputs of both models, the first one that diverges.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from shardproof.converter.card import get_card
from shardproof.converter.checkpoint import Violation
from shardproof.converter.dtypes import TORCH_DTYPES
from shardproof.converter.reassemble import reassemble
from shardproof.converter.source import HFCheckpoint

from .forward import Divergence, first_divergence, first_nonfinite, hidden_states, model_logits, random_batches, resolve_device
from .metrics import LogitMetrics, bit_identical, json_float, logit_metrics
from .weights import WeightComparison, compare_weights, format_rounded

Log = Callable[[str], None]


@dataclass(frozen=True)
class Thresholds:
    """Limits on the float32 model vs the checkpoint dtype's model; docs/verification.md says where they come from."""

    kl_mean: float
    top1_agreement: float
    cosine_min: float


PRECISION_THRESHOLDS: dict[str, Thresholds] = {
    "float32": Thresholds(kl_mean=1e-6, top1_agreement=0.99, cosine_min=0.99999),
    "float16": Thresholds(kl_mean=1e-3, top1_agreement=0.90, cosine_min=0.999),
    "bfloat16": Thresholds(kl_mean=3e-2, top1_agreement=0.80, cosine_min=0.95),
}

CONFIG_FIELDS = (
    "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_parameters", "max_position_embeddings",
    "attention_bias", "mlp_bias", "tie_word_embeddings",
)


@dataclass
class ForwardComparison:
    """The source cast to the checkpoint dtype against the reassembled model: must be bit-identical."""

    identical: bool
    metrics: LogitMetrics | None
    differing_sequences: list[int]
    problem: str | None = None

    def to_json(self) -> dict:
        return {
            "identical": self.identical,
            "metrics": self.metrics.to_json() if self.metrics else None,
            "differing_sequences": self.differing_sequences,
            "problem": self.problem,
        }


@dataclass
class PrecisionEffect:
    """The float32 source against the source cast to the checkpoint dtype: what the cast costs, against thresholds."""

    dtype: str
    metrics: LogitMetrics
    thresholds: Thresholds
    first_nonfinite_module: str | None = None

    @property
    def checks(self) -> dict[str, tuple[float, str, float, bool]]:
        """metric -> (value, comparison, threshold, passed); NaN fails every comparison."""
        m, t = self.metrics, self.thresholds
        return {
            "kl_mean": (m.kl_mean, "<=", t.kl_mean, m.kl_mean <= t.kl_mean),
            "top1_agreement": (m.top1_agreement, ">=", t.top1_agreement, m.top1_agreement >= t.top1_agreement),
            "cosine_min": (m.cosine_min, ">=", t.cosine_min, m.cosine_min >= t.cosine_min),
            "nonfinite": (m.nonfinite, "==", 0, m.nonfinite == 0),
        }

    @property
    def ok(self) -> bool:
        return all(passed for *_, passed in self.checks.values())

    def to_json(self) -> dict:
        return {
            "reference_dtype": "float32",
            "dtype": self.dtype,
            "ok": self.ok,
            "metrics": self.metrics.to_json(),
            "checks": {
                name: {"value": json_float(v), "op": op, "threshold": thr, "passed": ok}
                for name, (v, op, thr, ok) in self.checks.items()
            },
            "first_nonfinite_module": self.first_nonfinite_module,
        }


@dataclass
class Localization:
    """Where the two models first part: the module, and the differing weights of its layer (or of itself)."""

    sequence: int
    divergence: Divergence | None
    scope: str | None
    differing_tensors: list[str]

    def to_json(self) -> dict:
        d = self.divergence
        return {
            "sequence": self.sequence,
            "module": d.module if d else None,
            "max_abs_diff": json_float(d.max_abs_diff) if d else None,
            "first_diff_index": list(d.first_diff_index) if d and d.first_diff_index is not None else None,
            "detail": d.detail if d else None,
            "scope": self.scope,
            "differing_tensors": self.differing_tensors,
        }


@dataclass
class EquivalenceReport:
    """Everything the check found; `passed` only when every stage ran and found nothing."""

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
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        """One line per reason the check fails."""
        reasons = []
        if self.violations:
            reasons.append(f"{len(self.violations)} reassembly violation(s)")
        if self.config_differences:
            reasons.append(f"{len(self.config_differences)} config field(s) differ")
        if self.weights is None:
            reasons.append("the checkpoint could not be rebuilt, so weights and logits were not compared")
        if self.weights is not None and not self.weights.ok:
            reasons.append(f"{len(self.weights.mismatches) + len(self.weights.extra)} tensor(s) differ from the source")
        if self.forward is not None and not self.forward.identical:
            reasons.append(self.forward.problem or "logits are not bit-identical to the source's")
        if self.precision is not None and not self.precision.ok:
            failed = [name for name, (*_, ok) in self.precision.checks.items() if not ok]
            reasons.append(f"precision effect of {self.dtype} exceeds thresholds: {', '.join(failed)}")
        return reasons

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "failures": self.failures,
            "model_dir": self.model_dir,
            "checkpoint_dir": self.checkpoint_dir,
            "architecture": self.architecture,
            "dtype": self.dtype,
            "tp_size": self.tp_size,
            "pp_size": self.pp_size,
            "device": self.device,
            "num_sequences": self.num_sequences,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "violations": [{"rank": v.rank, "tensor": v.tensor, "problem": v.problem} for v in self.violations],
            "config_differences": self.config_differences,
            "notes": self.notes,
            "weights": self.weights.to_json() if self.weights else None,
            "forward": self.forward.to_json() if self.forward else None,
            "precision": self.precision.to_json() if self.precision else None,
            "localization": self.localization.to_json() if self.localization else None,
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
        }


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


def _hf_config(directory: Path | str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(directory), local_files_only=True)


def config_differences(source, rebuilt) -> list[str]:
    """The model-defining fields whose values differ between the source's and the reassembled model's HF configs."""
    missing = object()
    differences = []
    for name in CONFIG_FIELDS:
        a, b = getattr(source, name, missing), getattr(rebuilt, name, missing)
        if a is not missing and a != b:
            differences.append(f"{name}: {a!r} in the source, {'absent' if b is missing else repr(b)} in the checkpoint")
    return differences


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
    model_dir: Path | str,
    checkpoint_dir: Path | str,
    device: str = "auto",
    num_sequences: int = 4,
    seq_len: int = 256,
    seed: int = 0,
    log: Log | None = None,
) -> EquivalenceReport:
    """Check that the checkpoint at `checkpoint_dir` is the HF model at `model_dir` (see the module docstring).

    Bad input (unreadable directories, no CUDA for device="cuda") raises ShardproofError; everything the
    checkpoint gets wrong is in the report. `log` receives a line as each stage starts.
    """
    dev = resolve_device(device)
    random_batches(1, num_sequences, seq_len, seed)  # validates the sizes before any work
    get_card(HFCheckpoint(model_dir).architecture)  # the source must be a readable, supported model
    timings: dict[str, float] = {}
    stage = _stopwatch(timings, log)
    with tempfile.TemporaryDirectory(prefix="shardproof-reassembled-") as tmp:
        with stage("reassemble", "reassembling the rank files"):
            rebuilt = reassemble(checkpoint_dir, Path(tmp) / "hf")
        ckpt = rebuilt.checkpoint
        mapping = ckpt.mapping
        report = EquivalenceReport(
            str(model_dir), str(checkpoint_dir), ckpt.card.name, ckpt.layout.dtype, mapping.tp_size,
            mapping.pp_size, str(dev), num_sequences, seq_len, seed, violations=rebuilt.violations, timings=timings,
        )
        if rebuilt.output_dir is None:
            return report
        with stage("weights", "comparing every tensor with the source"):
            source_config, rebuilt_config = _hf_config(model_dir), _hf_config(rebuilt.output_dir)
            report.config_differences = config_differences(source_config, rebuilt_config)
            report.notes = sliding_window_note(source_config, seq_len)
            report.weights = compare_weights(model_dir, rebuilt.output_dir, ckpt)
            rounded = format_rounded(model_dir, ckpt.plan)
        if rounded:
            report.notes.append(
                f"{len(rounded)} source tensor(s) go through an op that rounds in {report.dtype}; "
                "the source model is compared with that rounding applied"
            )
        vocab = min(source_config.vocab_size, rebuilt_config.vocab_size)
        _compare_models(report, Path(model_dir), rounded, rebuilt.output_dir, vocab, dev, stage)
    return report


def _compare_models(
    report: EquivalenceReport,
    source: Path,
    rounded: dict[str, torch.Tensor],
    rebuilt: Path,
    vocab: int,
    dev: torch.device,
    stage: Callable,
) -> None:
    """Forward, precision and localization stages; `rounded` replaces source tensors after loading."""
    dtype = TORCH_DTYPES[report.dtype]
    input_ids = random_batches(vocab, report.num_sequences, report.seq_len, report.seed)
    with stage("forward", f"running the source ({report.dtype}) and the checkpoint's model on {dev}"):
        expected = model_logits(source, dtype, dev, input_ids, rounded)
        actual = model_logits(rebuilt, dtype, dev, input_ids)
        report.forward = _forward_comparison(expected, actual)
    # The dtype's cost is measured on the source cast to it, so that a conversion fault shows in the forward
    # comparison alone; when the conversion is exact the checkpoint's logits are these, bit for bit.
    with stage("precision", f"running the source in float32 on {dev}"):
        exact = dtype == torch.float32 and not rounded
        reference = expected if exact else model_logits(source, torch.float32, dev, input_ids)
        metrics = logit_metrics(reference, expected)
        report.precision = PrecisionEffect(report.dtype, metrics, PRECISION_THRESHOLDS[report.dtype])
        if metrics.nonfinite:
            sequence = int((~torch.isfinite(expected)).flatten(1).any(dim=1).nonzero()[0])
            states = hidden_states(source, dtype, dev, input_ids[sequence : sequence + 1], rounded)
            report.precision.first_nonfinite_module = first_nonfinite(states)
    if not report.weights.ok or not report.forward.identical or report.config_differences:
        with stage("localization", "capturing per-module outputs of both models"):
            report.localization = _localize(report, source, rounded, rebuilt, dtype, dev, input_ids)


def _forward_comparison(expected: torch.Tensor, actual: torch.Tensor) -> ForwardComparison:
    if expected.shape != actual.shape:
        problem = f"logits shapes differ: {list(actual.shape)} from the checkpoint, {list(expected.shape)} from the source"
        return ForwardComparison(False, None, list(range(expected.shape[0])), problem)
    differing = [i for i in range(expected.shape[0]) if not bit_identical(expected[i], actual[i])]
    return ForwardComparison(not differing, logit_metrics(expected, actual), differing)


def _localize(
    report: EquivalenceReport,
    source: Path,
    rounded: dict[str, torch.Tensor],
    rebuilt: Path,
    dtype: torch.dtype,
    dev: torch.device,
    input_ids: torch.Tensor,
) -> Localization:
    sequence = report.forward.differing_sequences[0] if report.forward.differing_sequences else 0
    ids = input_ids[sequence : sequence + 1]
    expected = hidden_states(source, dtype, dev, ids, rounded)
    divergence = first_divergence(expected, hidden_states(rebuilt, dtype, dev, ids))
    scope = None if divergence is None else _scope(divergence.module)
    differing = [t.name for t in report.weights.mismatches]
    if scope is not None:
        differing = [name for name in differing if name.startswith(scope + ".")]
    return Localization(sequence, divergence, scope, differing)


def _scope(module: str) -> str:
    """The decoder layer holding `module` (`model.layers.3`), or the module itself outside the layers."""
    match = re.match(r"(.*\.layers\.\d+)(\.|$)", module)
    return match.group(1) if match else module
