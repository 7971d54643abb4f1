"""TensorReader's two read paths give the stored tensors exactly: the host read and, on a GPU, the read through
pinned staging buffers (tensors smaller than, equal to and spanning several staging buffers; an empty one)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from shardproof.converter import safetensors_io
from shardproof.converter.errors import ShardproofError
from shardproof.converter.safetensors_io import TensorReader


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "small": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "exact": torch.randn(64, generator=g),  # 256 bytes: one staging buffer (STAGE_BYTES patched to 256)
        "spanning": torch.randn(1000, 3, generator=g).to(torch.float16),  # 6000 bytes: 24 buffers, the last partial
        "empty": torch.empty(0, 4),
    }


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the staged read runs on a GPU only"))])
def test_reads_give_back_the_stored_bits(tmp_path, monkeypatch, device):
    monkeypatch.setattr(safetensors_io, "STAGE_BYTES", 256)
    monkeypatch.setattr(safetensors_io, "_stages", __import__("threading").local())  # buffers of the patched size
    tensors = _tensors()
    save_file(tensors, tmp_path / "t.safetensors")
    reader = TensorReader(tmp_path / "t.safetensors")
    for name, expected in tensors.items():
        for got, where in ((reader.read(name), "cpu"), (reader.read_to(name, torch.device(device)), device)):
            assert got.device.type == where
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert torch.equal(got.cpu().view(torch.uint8), expected.view(torch.uint8)), name


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the staged read runs on a GPU only"))])
def test_a_truncated_file_is_bad_input_on_both_paths(tmp_path, device):
    save_file({"x": torch.arange(4096, dtype=torch.float32)}, tmp_path / "t.safetensors")
    reader = TensorReader(tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-100])
    with pytest.raises(ShardproofError, match="truncated"):
        reader.read_to("x", torch.device(device))
