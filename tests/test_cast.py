"""The converter's cast gives exactly torch's bits, for every bfloat16 and float16 bit pattern."""

from __future__ import annotations

import pytest
import torch

from shardproof.converter.cast import BLOCK_ELEMENTS, cast


def every_pattern(dtype: torch.dtype) -> torch.Tensor:
    """All 65536 16-bit patterns (NaNs, infinities, subnormals, both zeros), repeated past several blocks."""
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    return patterns.repeat(BLOCK_ELEMENTS * 3 // patterns.numel() + 1)[: BLOCK_ELEMENTS * 3 + 7].reshape(-1, 1)


@pytest.fixture(params=[1, 2], ids=["one torch thread (blocked)", "two torch threads (torch's cast)"])
def torch_threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.mark.parametrize("source, target", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)])
def test_cast_between_half_types_matches_torch_bit_for_bit(source, target, torch_threads):  # NaN payloads included
    tensor = every_pattern(source)
    got = cast(tensor, target)
    assert got.dtype == target and got.shape == tensor.shape
    assert torch.equal(got.view(torch.int16), tensor.to(target).view(torch.int16))


def test_cast_keeps_the_shape_of_a_non_contiguous_tensor(torch_threads):
    tensor = torch.randn(300, 500).to(torch.bfloat16).t()
    assert torch.equal(cast(tensor, torch.float16), tensor.to(torch.float16))
