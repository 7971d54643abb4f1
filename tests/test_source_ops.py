"""The source ops that reshape before sharding: exact, and undone exactly by their inverses."""

from __future__ import annotations

import torch

from shardproof.converter.transforms import TRANSPOSE, EqualChunks, FusedQKV, stored_shapes, to_source, to_stored


def test_transpose_stores_out_by_in_and_transposes_back() -> None:
    conv1d = torch.arange(6.0).reshape(2, 3)  # [in, out]
    (stored,) = to_stored((TRANSPOSE,), [conv1d], torch.float32)
    assert torch.equal(stored, torch.tensor([[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]))
    assert stored_shapes((TRANSPOSE,), [(2, 3)]) == ((3, 2),)
    assert torch.equal(to_source((TRANSPOSE,), [stored])[0], conv1d)


def test_chunk_splits_dim0_into_equal_parts_and_concatenates_back() -> None:
    fused = torch.arange(12.0).reshape(6, 2)
    q, k, v = to_stored((EqualChunks(3),), [fused], torch.float32)
    assert torch.equal(q, fused[0:2]) and torch.equal(k, fused[2:4]) and torch.equal(v, fused[4:6])
    assert stored_shapes((EqualChunks(3),), [(6, 2)]) == ((2, 2),) * 3
    assert torch.equal(to_source((EqualChunks(3),), [q, k, v])[0], fused)


def test_transpose_then_chunk_feeds_fused_qkv_per_rank() -> None:
    """A Conv1D [hidden, 3 * hidden] c_attn: transposed, split into q, k, v, then [q_r; k_r; v_r] per rank."""
    hidden, heads, tp = 4, 2, 2
    conv1d = torch.randn(hidden, 3 * hidden, dtype=torch.bfloat16)
    ops = (TRANSPOSE, EqualChunks(3))
    sources = to_stored(ops, [conv1d.float()], torch.bfloat16)
    shard = FusedQKV(heads, heads, hidden // heads)
    ranks = [shard.forward(sources, tp, r) for r in range(tp)]
    linear = conv1d.t()
    for r, local in enumerate(ranks):
        rows = [linear[part * hidden + r * 2 : part * hidden + r * 2 + 2] for part in range(3)]
        assert torch.equal(local, torch.cat(rows))
    back, problems = shard.inverse(ranks, stored_shapes(ops, [tuple(conv1d.shape)]))
    assert not problems and torch.equal(to_source(ops, back)[0], conv1d)
