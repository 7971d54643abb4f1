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
  runtime executes the single-forward semantics, which is what TensorRT-LLM's context phase computes
  (the attention kernels' ``update_rotary_base_n_scale``: the base grows when the sequence is longer than
  ``rotary_embedding_max_positions``).

What TensorRT-LLM executes (``layers/attention.py: Attention.create_attention_const_params`` and
``functional.py: RopeEmbeddingUtils``; the plugin picks the long longrope table when the longest context exceeds
``original_max_position_embeddings``) is the same formula as transformers' for every configuration except those
``unexecutable`` names: fields TensorRT-LLM does not read, or reads with other defaults, where the value changes the
math. There an engine would not compute the model's rotary embedding; the runtime raises ``CheckNotRun`` rather
than judge the checkpoint by a formula it does not run. Elsewhere the tables are computed in transformers'
operation order, so that float32 runs stay bit-identical to HF's.
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


def _yarn_attention_factors(s: Scaling, max_positions: int) -> tuple[float, float]:
    """(transformers' yarn attention factor, TensorRT-LLM's ``_mscale`` from ``create_sinusoidal_positions_yarn``)."""
    original = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_positions / original
    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
    hf = s.get("attention_factor")
    if hf is None:
        hf = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim) if mscale and mscale_all_dim
              else _yarn_mscale(factor))
    trt = _yarn_mscale(factor, s.get("mscale", 1.0)) / _yarn_mscale(factor, s.get("mscale_all_dim", 0.0))
    return float(hf), float(trt)


def longrope_mscale(max_positions: int, original: int) -> float:
    """TensorRT-LLM's longrope attention factor (``_calc_mscale`` of max / original positions), which it uses for
    both branches whatever ``longrope_*_mscale`` config.json holds, for every architecture a card converts."""
    scale = max_positions / original
    return 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original))


def unexecutable(scaling: Scaling, max_positions: int, long_rope: bool) -> str | None:
    """Why TensorRT-LLM would not compute the rotary embedding the config asks for, or None when it does.

    ``long_rope``: the scaling comes from ``position_embedding_type: long_rope`` (TensorRT-LLM's longrope);
    a ``rotary_scaling`` of type longrope under ``rope_gpt_neox`` is read for its ``factor`` only.
    """
    kind = scaling["rope_type"]
    if kind == "longrope" and not long_rope:
        return ("rotary_scaling of type longrope under position_embedding_type rope_gpt_neox: TensorRT-LLM reads "
                "only its 'factor' there (long_rope is its longrope)")
    if kind == "longrope":
        trt = longrope_mscale(max_positions, scaling["original_max_position_embeddings"])
        for branch in ("short", "long"):
            asked = scaling.get(f"{branch}_mscale")
            if asked is not None and not math.isclose(asked, trt, rel_tol=1e-6):
                return (f"longrope_{branch}_mscale {asked:g}: TensorRT-LLM uses {trt:g} (max / original positions) "
                        "and ignores the field")
    if kind == "yarn":
        if "original_max_position_embeddings" not in scaling or not scaling.get("factor"):
            return ("yarn rotary_scaling without 'factor' and 'original_max_position_embeddings': TensorRT-LLM's "
                    "defaults (1.0, 4096) differ from transformers'")
        if not scaling.get("truncate", True):
            return "yarn rotary_scaling with truncate false: TensorRT-LLM always truncates the correction range"
        hf, trt = _yarn_attention_factors(scaling, max_positions)
        if not math.isclose(hf, trt, rel_tol=1e-6):
            return (f"yarn attention factor: the model's is {hf:g}, TensorRT-LLM's {trt:g} (it reads mscale and "
                    "mscale_all_dim, never attention_factor)")
    if kind == "llama3" and "original_max_position_embeddings" not in scaling:
        return 'rotary_scaling "llama3" without original_max_position_embeddings: TensorRT-LLM defaults it to 8192'
    return None
