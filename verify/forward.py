"""Running HF models on token batches, one model on the device at a time, and capturing per-module outputs.

Every run loads a model, runs it, moves what it produced to the CPU and frees the model before the next one
is loaded, so a model that fits the device once is enough; hidden states for localization go to the CPU too.
"""

from __future__ import annotations

import gc
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from shardproof.converter.card import get_card
from shardproof.converter.errors import ShardproofError
from shardproof.converter.source import open_source

from .metrics import bit_identical, first_difference, max_abs_diff


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

    Checked on creation (bad values raise ShardproofError naming the option); `fit` checks seq_len against a model.
    """

    device: str = "auto"
    num_sequences: int = 4
    seq_len: int = 256
    seed: int = 0

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

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def fit(self, max_positions: int | None, model: str) -> None:
        """ShardproofError when seq_len exceeds the model's max_position_embeddings (None: unknown)."""
        if max_positions is not None and self.seq_len > max_positions:
            raise ShardproofError(f"--seq-len {self.seq_len}: above max_position_embeddings={max_positions} of {model}")

    def input_ids(self, vocab_size: int) -> torch.Tensor:
        """Token ids [num_sequences, seq_len], uniform over the vocabulary, reproducible from the seed."""
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randint(0, vocab_size, (self.num_sequences, self.seq_len), generator=generator)


def one_line(error: Exception) -> str:
    """An exception's message on one line (its type when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def load_model(
    model_dir: Path | str, dtype: torch.dtype, device: torch.device, overrides: Mapping[str, torch.Tensor] | None = None
) -> torch.nn.Module:
    """An HF causal LM from a local model directory in any registered format, with every weight cast to `dtype`, then
    the source tensors named in `overrides` replaced by those values, in eval mode on `device`. Tensor names go
    through the card's `hf_key_mapping` to transformers' parameter names. transformers reads the directory itself
    when its format says it can; otherwise the model is built from the source's config and its tensors."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    source = open_source(model_dir)
    card = get_card(source.architecture)
    mapping = {"key_mapping": dict(card.hf_key_mapping)} if card.hf_key_mapping else {}
    own = source.loader.transformers_reads_directory
    tensors = None if own else {name: source.load(name) for name in source.tensors}
    try:
        if own:
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True, **mapping)
        else:
            model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(source.hf_config)]
            model = model_class.from_pretrained(None, config=source.hf_config, state_dict=tensors, dtype=dtype, **mapping)
    except Exception as e:  # reading the input failed: bad input, never a failed check
        raise ShardproofError(f"{model_dir}: transformers cannot load the model ({one_line(e)})") from None
    if overrides:
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in overrides.items():
                parameters[card.hf_name(name)].copy_(value)
    return model.to(device).eval()


def release(device: torch.device) -> None:
    """Return freed memory (a model just dropped) to the device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def model_logits(
    model_dir: Path | str,
    dtype: torch.dtype,
    device: torch.device,
    input_ids: torch.Tensor,
    overrides: Mapping[str, torch.Tensor] | None = None,
    batch_size: int = 8,
) -> torch.Tensor:
    """Logits [num_sequences, seq_len, vocab] on the CPU, in the model's dtype; the model is freed on return."""
    model = load_model(model_dir, dtype, device, overrides)
    try:
        with torch.inference_mode():
            logits = [
                model(input_ids=batch.to(device), use_cache=False).logits.to("cpu")
                for batch in input_ids.split(batch_size)
            ]
    finally:
        del model
        release(device)
    return torch.cat(logits)


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def hidden_states(
    model_dir: Path | str,
    dtype: torch.dtype,
    device: torch.device,
    input_ids: torch.Tensor,
    overrides: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Every module's output (its first tensor) for `input_ids`, on the CPU, in the order the modules ran.

    A module that runs more than once keeps its first output. The model is freed on return.
    """
    model = load_model(model_dir, dtype, device, overrides)
    states: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is not None and name not in states:
                states[name] = tensor.detach().to("cpu", copy=True)

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules() if name]
    try:
        with torch.inference_mode():
            model(input_ids=input_ids.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        del model, handles
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
