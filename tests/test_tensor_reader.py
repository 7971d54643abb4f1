"""TensorReader's read paths give the stored tensors exactly: the plain host read and the staged read, as stored or
cast a buffer at a time (on the host, and on a GPU through pinned buffers), for tensors smaller than, equal to and
spanning several staging buffers, and an empty one; the block read gives the stored bytes and the plain read's
digest."""

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
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            got, want = reader.read_to(name, torch.device(device), dtype), expected.to(dtype)
            assert got.device.type == device and got.dtype == dtype and got.shape == want.shape
            assert torch.equal(got.cpu().view(torch.int16 if dtype.itemsize == 2 else torch.int32),
                               want.view(torch.int16 if dtype.itemsize == 2 else torch.int32)), (name, dtype)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the staged read runs on a GPU only"))])
def test_a_truncated_file_is_bad_input_on_every_path(tmp_path, device):
    save_file({"x": torch.arange(4096, dtype=torch.float32)}, tmp_path / "t.safetensors")
    reader = TensorReader(tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-100])
    for dtype in (None, torch.bfloat16):
        with pytest.raises(ShardproofError, match="truncated"):
            reader.read_to("x", torch.device(device), dtype)
    with pytest.raises(ShardproofError, match="truncated"):
        list(reader.blocks("x", 1000))


@pytest.mark.parametrize("block_bytes", [1, 7, 256, 6000, 1 << 20])
def test_blocks_give_the_stored_bytes_and_the_plain_reads_digest(tmp_path, block_bytes):
    tensors = {name: t for name, t in _tensors().items() if t.numel()}
    save_file(tensors, tmp_path / "t.safetensors")
    plain, streamed = TensorReader(tmp_path / "t.safetensors"), TensorReader(tmp_path / "t.safetensors")
    plain.digests, streamed.digests = {}, {}
    for name, expected in tensors.items():
        blocks = [block.clone() for block in streamed.blocks(name, block_bytes)]  # each buffer is reused
        stored = expected.contiguous().view(-1).view(torch.uint8)
        assert all(len(block) == block_bytes for block in blocks[:-1]) and 0 < len(blocks[-1]) <= block_bytes
        assert torch.equal(torch.cat(blocks), stored), name
        plain.read(name)
    assert streamed.digests == plain.digests and streamed.digests.keys() == tensors.keys()
