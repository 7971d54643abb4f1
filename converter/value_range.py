"""Non-finite and out-of-range values: refused by default, converted as they are, or saturated on request.

A float16 cast turns a source value beyond ±65504 into ±inf, and NaN or Inf in a source tensor would be copied
into the checkpoint: both convert without complaint yet break the engine. `ValueGuard.stored` judges each
stored tensor once, right after `to_stored`, inside the staging directory, so a refusal leaves no output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .errors import ShardproofError
from .plan import PlannedTensor
from .transforms import to_stored


@dataclass
class ValueGuard:
    """What a conversion does with non-finite values (`where` names the model directory in errors), and what it
    did: `nonfinite` (converted as they are) and `clamped` count values per source tensor."""

    where: str
    allow_nonfinite: bool = False
    clamp: bool = False
    nonfinite: dict[str, int] = field(default_factory=dict)
    clamped: dict[str, int] = field(default_factory=dict)

    def stored(self, target: PlannedTensor, sources: Sequence[torch.Tensor], stored: list[torch.Tensor]) -> list[torch.Tensor]:
        """`stored` (to_stored of `sources` for `target`) if every value is finite, else as the flags allow:
        overflow of the cast saturated to the dtype's finite max with `clamp`, non-finite values kept with
        `allow_nonfinite`; otherwise ShardproofError naming the source tensor, the count and max |value|."""
        if all(_all_finite(t) for t in stored):
            return stored
        dtype = target.torch_dtype
        nonfinite = {name: int((~torch.isfinite(t)).sum()) for name, t in zip(target.sources, sources)}
        overflow = sum(int((~torch.isfinite(t)).sum()) for t in stored) - sum(nonfinite.values())
        peaks = {name: _peak(t) for name, t in zip(target.sources, sources)}
        kept = {name: count for name, count in nonfinite.items() if count}
        for name, count in kept.items():
            if not self.allow_nonfinite:
                raise ShardproofError(
                    f"{self.where}: source tensor {name!r} holds {count} non-finite value(s) (NaN/Inf), max |finite "
                    f"value| {peaks[name]:.6g}; pass --allow-nonfinite to convert them as they are")
        if overflow:
            name = max(peaks, key=peaks.get)  # the cast overflows the largest values: the culprit among several sources
            if not (self.clamp or self.allow_nonfinite):
                raise ShardproofError(
                    f"{self.where}: source tensor {name!r} holds {overflow} value(s) beyond {target.dtype}'s finite "
                    f"range ±{torch.finfo(dtype).max:.6g}, max |value| {peaks[name]:.6g}; pass --clamp to saturate them "
                    f"or --allow-nonfinite to store them as inf")
            if self.clamp:
                self.clamped[name] = overflow
            else:
                kept[name] = kept.get(name, 0) + overflow
        self.nonfinite.update(kept)  # assigned, not added: a tied source judged for two targets counts once
        if not (self.clamp and overflow):
            return stored
        limit = torch.finfo(dtype).max  # float64 holds every source value exactly, so in-range values cast as before
        saturated = [torch.where(torch.isfinite(t), t.double().clamp(-limit, limit), t.double()) for t in sources]
        return to_stored(target.ops, saturated, dtype)

    def notes(self) -> list[str]:
        """What was converted as it is and what was clamped, one line each (none when every value was finite)."""
        notes = []
        if self.nonfinite:
            notes.append(f"converted {sum(self.nonfinite.values())} non-finite value(s) as they are (--allow-nonfinite) "
                        f"in {_names(self.nonfinite)}")
        if self.clamped:
            notes.append(f"clamped {sum(self.clamped.values())} out-of-range value(s) to the dtype's finite max (--clamp) "
                        f"in {_names(self.clamped)}")
        return notes


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite: one min/max pass, which propagates NaN and keeps ±inf (measured 7 × faster
    than `isfinite().all()` on a float16 tensor, which allocates a mask; docs/performance.md)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _peak(tensor: torch.Tensor) -> float:
    """max |value| over the finite values (0 when there are none)."""
    finite = tensor[torch.isfinite(tensor)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def _names(counts: dict[str, int]) -> str:
    shown = ", ".join(f"{name} ({count})" for name, count in list(counts.items())[:5])
    return shown + (f" and {len(counts) - 5} more tensor(s)" if len(counts) > 5 else "")
