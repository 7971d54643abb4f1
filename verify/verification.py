"""The verdict over one checkpoint: the reassembled mode, the sharded mode, or both.

- reassembled: the rank files are inverted back into an HF checkpoint, compared with the source bit for bit,
  and run with transformers (verify/equivalence.py). It proves converter and reassembler are inverses.
- sharded: the rank files are run as TensorRT-LLM would run them (verify/runtime/) and compared
  with the HF original (verify/sharded_check.py). It catches a fault the converter and reassembler share.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from shardproof.converter.errors import ShardproofError

from .equivalence import EquivalenceReport, verify_equivalence
from .forward import random_batches, resolve_device
from .sharded_check import ShardedReport, sharded_check

MODES = ("both", "reassembled", "sharded")
Log = Callable[[str], None]


@dataclass
class Verification:
    """The reports of the modes that ran; `passed` only when every one of them passed."""

    mode: str
    reassembled: EquivalenceReport | None = None
    sharded: ShardedReport | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        reasons = [f"reassembled: {r}" for r in (self.reassembled.failures if self.reassembled else [])]
        return reasons + [f"sharded: {r}" for r in (self.sharded.failures if self.sharded else [])]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "mode": self.mode,
            "failures": self.failures,
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "reassembled": self.reassembled.to_json() if self.reassembled else None,
            "sharded": self.sharded.to_json() if self.sharded else None,
        }


def verify_checkpoint(
    model_dir: Path | str,
    checkpoint_dir: Path | str,
    mode: str = "both",
    device: str = "auto",
    num_sequences: int = 4,
    seq_len: int = 256,
    seed: int = 0,
    log: Log | None = None,
) -> Verification:
    """Run the chosen mode(s) on the same random token batches; bad input raises ShardproofError."""
    _check_arguments(mode, device, num_sequences, seq_len, seed)
    result = Verification(mode)
    if mode in ("both", "reassembled"):
        result.reassembled = verify_equivalence(model_dir, checkpoint_dir, device, num_sequences, seq_len, seed, log)
        result.timings.update(result.reassembled.timings)
    if mode in ("both", "sharded"):
        if log:
            log("running the rank files with the sharded reference runtime")
        start = time.perf_counter()
        result.sharded = sharded_check(model_dir, checkpoint_dir, device, num_sequences, seq_len, seed)
        result.timings["sharded"] = time.perf_counter() - start
    return result


def convert_and_check(
    model_dir: Path | str,
    output_dir: Path | str | None = None,
    dtype: str = "auto",
    tp_size: int = 1,
    pp_size: int = 1,
    use_parallel_embedding: bool = False,
    embedding_sharding_dim: int = 0,
    overwrite: bool = False,
    mode: str = "both",
    device: str = "auto",
    num_sequences: int = 4,
    seq_len: int = 256,
    seed: int = 0,
    log: Log | None = None,
) -> Verification:
    """Convert `model_dir` (into `output_dir`, or a temporary directory removed afterwards), then verify it."""
    from shardproof.converter.api import convert

    _check_arguments(mode, device, num_sequences, seq_len, seed)  # before the conversion, not after it
    with _output(output_dir) as out:
        if log:
            log(f"converting {model_dir} (dtype {dtype}, tp={tp_size}, pp={pp_size})")
        start = time.perf_counter()
        convert(model_dir, out, dtype, tp_size, pp_size, use_parallel_embedding, embedding_sharding_dim, overwrite)
        elapsed = time.perf_counter() - start
        result = verify_checkpoint(model_dir, out, mode, device, num_sequences, seq_len, seed, log)
    result.timings = {"convert": elapsed, **result.timings}
    return result


def _check_arguments(mode: str, device: str, num_sequences: int, seq_len: int, seed: int) -> None:
    if mode not in MODES:
        raise ShardproofError(f"--mode {mode!r} is not one of {', '.join(MODES)}")
    resolve_device(device)
    random_batches(1, num_sequences, seq_len, seed)


@contextlib.contextmanager
def _output(output_dir: Path | str | None) -> Iterator[Path]:
    if output_dir is not None:
        yield Path(output_dir)
        return
    with tempfile.TemporaryDirectory(prefix="shardproof-check-") as tmp:
        yield Path(tmp) / "checkpoint"
