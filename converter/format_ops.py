"""Value transforms a format needs beyond moving data, each with its inverse and its declared rounding.

A format op runs on the source tensor in float32 and casts once to the checkpoint dtype, as TensorRT-LLM
does (Gemma: `param + 1.0  # upcasted to float32`). Its inverse runs in float32 too. Unlike sharding, such an
op can round: `round_trip` is what reassembly must give back for a source tensor, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AddOne:
    """Stored = source + 1: for norms whose HF module multiplies by (1 + weight) and the runtime by the weight."""

    name = "add_one"

    def forward(self, source: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (source.float() + 1.0).to(dtype)

    def inverse(self, stored: torch.Tensor) -> torch.Tensor:
        return (stored.float() - 1.0).to(stored.dtype)

    def round_trip(self, source: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The reassembled value of `source`: 1 + weight rounds in `dtype`, the weight itself does not."""
        return self.inverse(self.forward(source, dtype))


FormatOp = AddOne
ADD_ONE = AddOne()
