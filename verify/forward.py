"""Running HF models on token batches and capturing per-module outputs.

Every run streams the model through the device one unit (decoder layer, embedding, norm, lm_head) at a time
(`verify/streaming.py`) and moves what it produced to the CPU, so host and device memory hold a few layers and
the activations, whatever the model's size; hidden states for localization go to the CPU too.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shardproof.converter.errors import ShardproofError
from shardproof.converter.source import Source

from .lockstep import Pass, run_passes
from .metrics import bit_identical, first_difference, max_abs_diff
from .thresholds import UserLimits
from .streaming import Progress, ResidentParameters, StreamedModel, ValueFn, release


def resolve_device(device: str) -> torch.device:
    """`auto` (cuda when available, else cpu), `cpu` or `cuda[:N]`; asking for an absent GPU is bad input."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" or re.fullmatch(r"cuda(:\d+)?", device):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ShardproofError(f"--device {device}: CUDA is not available (torch {torch.__version__})")
        return torch.device(device)
    raise ShardproofError(f"--device {device!r} is not one of auto, cpu, cuda")


MAX_SEQ_LEN = 32768  # tokens per sequence, whatever the model allows
MAX_TOKENS = 131072  # num_sequences x seq_len: each model run keeps tokens x vocab logits in host memory
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class BatchOptions:
    """The random token batches every model runs on: where, how many, how long, from which seed.

    `limits` are the user's own limits on the dtype's cost (none by default). `max_device_memory` (GiB, None: no
    cap) caps what a run may hold: on CUDA the process's share of the device
    (`limit_device_memory`), everywhere the parameters resident at once (`resident`).
    Checked on creation (bad values raise ShardproofError naming the option); `fit` checks seq_len against a model.
    """

    device: str = "auto"
    num_sequences: int = 4
    seq_len: int = 256
    seed: int = 0
    max_device_memory: float | None = None
    limits: UserLimits = UserLimits()

    def __post_init__(self) -> None:
        resolve_device(self.device)
        n, length = self.num_sequences, self.seq_len
        if n < 1:
            raise ShardproofError(f"--num-sequences {n}: must be at least 1")
        if not 1 <= length <= MAX_SEQ_LEN:
            raise ShardproofError(f"--seq-len {length}: must be between 1 and {MAX_SEQ_LEN}")
        if n * length > MAX_TOKENS:
            raise ShardproofError(f"--num-sequences {n} x --seq-len {length} = {n * length} tokens: above the limit of {MAX_TOKENS}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ShardproofError(f"--seed {self.seed}: must be between 0 and 2**63 - 1")
        cap = self.max_device_memory
        if cap is not None and not (isinstance(cap, (int, float)) and math.isfinite(cap) and cap > 0):
            raise ShardproofError(f"--max-device-memory {cap}: must be a positive number of GiB")

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def resident(self) -> ResidentParameters:
        """A new account of the parameters resident at once, capped at max_device_memory."""
        cap = self.max_device_memory
        return ResidentParameters(None if cap is None else int(cap * 2**30))

    def limit_device_memory(self) -> None:
        """On CUDA, cap this process's share of the device at max_device_memory (the allocator refuses beyond it),
        its segments expandable unless PYTORCH_CUDA_ALLOC_CONF says otherwise: under a cap, memory reserved in
        fixed blocks but free (2.1 GiB of a 7 GiB cap at 8B) was what refused a large tensor."""
        device = self.torch_device
        if self.max_device_memory is None or device.type != "cuda":
            return
        if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")
        index = torch.cuda.current_device() if device.index is None else device.index  # "cuda" names no index
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, self.max_device_memory * 2**30 / total), index)

    def fit(self, max_positions: int | None, model: str) -> None:
        """ShardproofError when seq_len exceeds the model's max_position_embeddings (None: unknown)."""
        if max_positions is not None and self.seq_len > max_positions:
            raise ShardproofError(f"--seq-len {self.seq_len}: above max_position_embeddings={max_positions} of {model}")

    def input_ids(self, vocab_size: int) -> torch.Tensor:
        """Token ids [num_sequences, seq_len], uniform over the vocabulary, reproducible from the seed."""
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randint(0, vocab_size, (self.num_sequences, self.seq_len), generator=generator)


def logits_pass(dtype: torch.dtype, device: torch.device, input_ids: torch.Tensor,
                value: ValueFn | None = None) -> Pass[torch.Tensor]:
    """A streamed pass giving the logits [num_sequences, seq_len, vocab] on the CPU, in the model's dtype, for the
    whole batch at once (`verify/lockstep.py`)."""
    return Pass(dtype, lambda model: model(input_ids=input_ids.to(device), use_cache=False).logits.to("cpu"), value)


def model_logits(
    model_dir: Path | str | Source,
    dtype: torch.dtype,
    device: torch.device,
    input_ids: torch.Tensor,
    value: ValueFn | None = None,
    resident: ResidentParameters | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """`logits_pass`'s logits, the model streamed through `device` once (`value`, `resident`, `progress`:
    `StreamedModel`'s)."""
    return run_passes(model_dir, [logits_pass(dtype, device, input_ids, value)], device, resident, progress)[0]


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def hidden_states(
    model_dir: Path | str | Source,
    dtype: torch.dtype,
    device: torch.device,
    input_ids: torch.Tensor,
    value: ValueFn | None = None,
    resident: ResidentParameters | None = None,
) -> dict[str, torch.Tensor]:
    """Every module's output (its first tensor) for `input_ids`, on the CPU, in the order the modules ran.

    A module that runs more than once keeps its first output.
    """
    states: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is not None and name not in states:
                states[name] = tensor.detach().to("cpu", copy=True)

        return record

    try:
        with StreamedModel(model_dir, dtype, device, value, resident) as streamed, torch.inference_mode():
            model = streamed.model
            for name, module in model.named_modules():
                if name:
                    module.register_forward_hook(hook(name))
            model(input_ids=input_ids.to(device), use_cache=False)
    finally:
        release(device)
    return states


@dataclass(frozen=True)
class Divergence:
    """The first module, in execution order, whose output is not bit-identical between two runs."""

    module: str
    max_abs_diff: float
    first_diff_index: tuple[int, ...] | None
    detail: str | None = None


def first_divergence(reference: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor]) -> Divergence | None:
    """Walk `reference`'s modules in execution order; None when every module's output is identical."""
    for name, ref in reference.items():
        cand = candidate.get(name)
        if cand is None:
            return Divergence(name, float("inf"), None, "module missing from the checkpoint's model")
        if not bit_identical(ref, cand):
            if ref.shape != cand.shape or ref.dtype != cand.dtype:
                detail = f"output {cand.dtype} {list(cand.shape)}, expected {ref.dtype} {list(ref.shape)}"
                return Divergence(name, float("inf"), None, detail)
            return Divergence(name, max_abs_diff(ref, cand), first_difference(ref, cand))
    return None


def first_nonfinite(states: dict[str, torch.Tensor]) -> str | None:
    """The first module, in execution order, whose output holds an inf or NaN."""
    return next((name for name, t in states.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
