"""Rotary inverse frequencies and attention scaling per scaling type, as transformers computes them.

Each function repeats, in float32 and in the same order, the operations of transformers 5's
``modeling_rope_utils`` (``ROPE_INIT_FUNCTIONS`` and ``dynamic_rope_update``), so the cos/sin tables match
HF's bit for bit. Two types depend on the sequence length ``T`` of the forward:

* ``longrope``: the long factors when ``T > original_max_position_embeddings``, else the short ones
  (``longrope_frequency_update``); the attention scaling is the checkpoint's mscale for that branch.
* ``dynamic`` (NTK): a fresh model running one full sequence rescales the base only when
  ``T > max_position_embeddings`` (``dynamic_frequency_update`` grows from ``max_position_embeddings``, and
  then computes the new base from a tensor, i.e. in float32). A transformers model that already ran a longer
  sequence keeps that larger table for shorter ones until they drop below ``max_position_embeddings``; the
  runtime executes the single-forward semantics, which is what TensorRT-LLM's context phase computes.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

Scaling = dict[str, Any]


def _exponents(dim: int) -> Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).float() / dim


def default(base: float, dim: int) -> Tensor:
    return 1.0 / (base ** _exponents(dim))


def _linear(s: Scaling, base: float, dim: int, max_positions: int, seq_len: int) -> tuple[Tensor, float]:
    inv_freq = default(base, dim)
    inv_freq /= s["factor"]
    return inv_freq, 1.0


def _dynamic(s: Scaling, base: float, dim: int, max_positions: int, seq_len: int) -> tuple[Tensor, float]:
    factor = s["factor"]
    if seq_len > max_positions:  # the growth branch: seq_len arrives as an int64 tensor
        seq: Any = torch.maximum(torch.tensor(seq_len), torch.tensor(max_positions))
    else:  # the table built at init, from plain numbers
        seq = max_positions
    scaled_base = base * ((factor * seq / max_positions) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (scaled_base ** _exponents(dim)), 1.0


def _wavelength_bands(s: Scaling, base: float, dim: int, max_positions: int, seq_len: int) -> tuple[Tensor, float]:
    inv_freq = default(base, dim)
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s.get("original_max_position_embeddings", max_positions)  # transformers' default
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_ctx / hi) * ~(wavelen > old_ctx / lo)
    return torch.where(medium, smoothed, scaled), 1.0


def _yarn_mscale(scale: float, mscale: float = 1) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(s: Scaling, base: float, dim: int, max_positions: int, seq_len: int) -> tuple[Tensor, float]:
    original = s.get("original_max_position_embeddings", max_positions)  # transformers' default
    factor = s.get("factor") or max_positions / original
    attention = s.get("attention_factor")
    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
    if attention is None:
        attention = (float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
                     if mscale and mscale_all_dim else _yarn_mscale(factor))
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    return interpolation * (1 - keep) + extrapolation * keep, attention


def _longrope(s: Scaling, base: float, dim: int, max_positions: int, seq_len: int) -> tuple[Tensor, float]:
    original = s.get("original_max_position_embeddings", max_positions)  # transformers' default
    long = seq_len > original
    factors = torch.tensor(s["long_factor"] if long else s["short_factor"], dtype=torch.float32)
    mscale = s.get("long_mscale" if long else "short_mscale")  # TensorRT-LLM's names for the attention factor
    if mscale is None:
        mscale = s.get("attention_factor")
    if mscale is None:  # transformers' default, which is also TensorRT-LLM's (`_calc_mscale`)
        factor = s.get("factor") or max_positions / original
        mscale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return 1.0 / (factors * base ** _exponents(dim)), mscale


INV_FREQ: dict[str, Callable[[Scaling, float, int, int, int], tuple[Tensor, float]]] = {
    "linear": _linear, "dynamic": _dynamic, "llama3": _wavelength_bands, "yarn": _yarn, "longrope": _longrope,
}


def inv_freq(scaling: Scaling | None, base: float, dim: int, max_positions: int, seq_len: int) -> tuple[Tensor, float]:
    """(float32 inverse frequencies [dim / 2], attention scaling) for a forward over ``seq_len`` tokens."""
    if scaling is None:
        return default(base, dim), 1.0
    return INV_FREQ[scaling["rope_type"]](scaling, base, dim, max_positions, seq_len)
