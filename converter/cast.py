"""dtype casts as the converter stores them; bfloat16 -> float16 goes through float32 in cache-sized blocks.

torch casts bfloat16 to float16 element by element through float, which on one thread runs at about 60 % of the
speed of the two vectorized casts it is made of (measured: docs/performance.md). Both routes round once, from the
exact float32 value, so the bits are the same (tests/test_cast.py checks every bit pattern). float16 -> bfloat16
is left to torch: its direct cast makes every NaN canonical, the route through float32 keeps NaN payloads.
"""

from __future__ import annotations

import torch

# 1 MiB of float32 stays in a core's L2 cache between the two casts. Each block costs four torch calls under the
# GIL; with 16 workers, blocks of 32768 elements made the casts wait on the GIL (thread-seconds in the cast 17 x its
# work, bench/convert_phases.py, docs/performance.md), blocks 8 x larger make those calls negligible.
BLOCK_ELEMENTS = 1 << 18


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.to(dtype)` with the same bits; bfloat16 -> float16 through float32 one block at a time when torch
    runs on one thread (the converter's workers), torch's own cast otherwise (it fans blocks out to its intra-op
    pool, which for blocks of this size costs far more than it gains)."""
    if not through_float32(tensor.dtype, dtype) or tensor.numel() <= BLOCK_ELEMENTS:
        return tensor.to(dtype)
    out = torch.empty(tensor.shape, dtype=dtype)
    cast_block(tensor.contiguous().view(-1), out.view(-1), torch.empty(BLOCK_ELEMENTS, dtype=torch.float32))
    return out


def through_float32(source: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether `cast` goes through float32 blocks from `source` to `dtype`."""
    return (source, dtype) == (torch.bfloat16, torch.float16) and torch.get_num_threads() == 1


def cast_block(source: torch.Tensor, out: torch.Tensor, block: torch.Tensor | None) -> None:
    """`source` cast into `out` (as many elements, 1-D), through `block` (float32) a block's length at a time when
    given."""
    if block is None:
        out.copy_(source)
        return
    for start in range(0, source.numel(), block.numel()):
        staged = block[: min(block.numel(), source.numel() - start)]
        staged.copy_(source[start : start + staged.numel()])
        out[start : start + staged.numel()].copy_(staged)
