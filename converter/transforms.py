"""Transforms: how source tensors become one rank's tensor, and back. They know no architecture.

Two kinds, composed by a card's rows:
- a *source op* (`SourceOp`) changes the source tensors before sharding: a value transform such as a norm stored as
  `1 + weight`, a layout change such as a transpose, or a split of one fused tensor into parts. An op maps the
  list of tensors (and their shapes) to a new list, one source at a time. `to_stored` is the one place that
  applies ops and the cast: ops that round run in float32 and the result is cast once; exact ops commute with
  the cast. `to_source` inverts them, and `round_trip` is what reassembly must give back, bit for bit.
- a *shard* turns the (stored) source tensors into the tensor one TP rank keeps, and all ranks' tensors back,
  reporting every way the rank tensors disagree with what the forward direction must have made (replicas that
  differ, padding that is not zero). A row names a shard directly, or a *spec* (`resolve(dims, layout)`) when
  the shard depends on the model's dimensions or the layout (fused QKV, the embedding).

Both are open sets: any object with these methods works; the built-in ones are below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

Shape = tuple[int, ...]
Problem = tuple[int, str]  # (tp_rank, what is wrong with that rank's tensor)


class Shard(Protocol):
    """Source tensors (already as stored) -> one TP rank's tensor, and every rank's tensors -> the sources."""

    n_sources: int
    kind: str

    def check(self, shapes: Sequence[Shape], tp: int) -> str | None: ...

    def local_shape(self, shapes: Sequence[Shape], tp: int) -> Shape: ...

    def forward(self, sources: Sequence[torch.Tensor], tp: int, tp_rank: int) -> torch.Tensor: ...

    def inverse(self, locals_: Sequence[torch.Tensor], shapes: Sequence[Shape]) -> tuple[list[torch.Tensor], list[Problem]]: ...

    def resolve(self, dims: Any, layout: Any) -> "Shard": ...


class SourceOp(Protocol):
    """A transform of the source tensors before sharding; `exact` False means it rounds (run in float32).

    `forward_all` / `inverse_all` map the whole list (an op may turn one tensor into several and back);
    `shapes` maps their shapes the way `forward_all` maps the tensors. `PerTensor` derives all three from a
    one-tensor `forward`, `inverse` and `shape`.
    """

    name: str
    exact: bool

    def forward_all(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]: ...

    def inverse_all(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]: ...

    def shapes(self, shapes: Sequence[Shape]) -> list[Shape]: ...


class PerTensor:
    """A source op applied to each tensor alone: subclasses define `forward`, `inverse` and, when it changes,
    `shape`."""

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def inverse(self, tensor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def shape(self, shape: Shape) -> Shape:
        return shape

    def forward_all(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.forward(t) for t in tensors]

    def inverse_all(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.inverse(t) for t in tensors]

    def shapes(self, shapes: Sequence[Shape]) -> list[Shape]:
        return [self.shape(s) for s in shapes]


def stored_shapes(ops: Sequence[SourceOp], shapes: Sequence[Shape]) -> tuple[Shape, ...]:
    """The shapes of the source tensors after `ops`: what the shard splits."""
    out = list(shapes)
    for op in ops:
        out = op.shapes(out)
    return tuple(out)


def to_stored(ops: Sequence[SourceOp], tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Source tensors as the checkpoint stores them, before sharding: ops that round run in float32 (as
    TensorRT-LLM does: "upcasted to float32 in case of bfloat16") and the result is cast to `dtype` once."""
    if all(op.exact for op in ops):
        out = [t.to(dtype) for t in tensors]
        for op in ops:
            out = op.forward_all(out)
        return out
    out = [t.float() for t in tensors]
    for op in ops:
        out = op.forward_all(out)
    return [t.to(dtype) for t in out]


def to_source(ops: Sequence[SourceOp], tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The inverse of `to_stored`, in the stored dtype: ops undone in reverse order (in float32 when one rounds)."""
    if all(op.exact for op in ops):
        out = list(tensors)
        for op in reversed(ops):
            out = op.inverse_all(out)
        return out
    dtype = tensors[0].dtype
    out = [t.float() for t in tensors]
    for op in reversed(ops):
        out = op.inverse_all(out)
    return [o.to(dtype) for o in out]


def round_trip(ops: Sequence[SourceOp], tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What reassembly gives back for a source tensor: the cast, and the rounding of any op that rounds."""
    return to_source(ops, to_stored(ops, [tensor], dtype))[0]


@dataclass(frozen=True)
class AddOne(PerTensor):
    """Stored = source + 1: for norms whose HF module multiplies by (1 + weight) and the runtime by the weight.
    It rounds: 1 + w is not exact in any floating dtype."""

    name = "add_one"
    exact = False

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor + 1.0

    def inverse(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor - 1.0


ADD_ONE = AddOne()


@dataclass(frozen=True)
class Transpose(PerTensor):
    """Stored = source.T: for weights stored `[in, out]` (a Conv1D) where the checkpoint needs `[out, in]`.
    Exact; a 1-D tensor (a bias) has no transpose, so a row applies it to matrices only."""

    name = "transpose"
    exact = True

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.t().contiguous()

    def inverse(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.t().contiguous()

    def shape(self, shape: Shape) -> Shape:
        rows, cols = shape
        return (cols, rows)


@dataclass(frozen=True)
class Chunk:
    """Each source tensor split on dim 0 into `parts` equal parts (a fused [q; k; v] into q, k, v for a shard
    that takes them separately). Exact; the inverse concatenates every `parts` consecutive tensors."""

    parts: int
    exact = True

    @property
    def name(self) -> str:
        return f"chunk{self.parts}"

    def forward_all(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [part for t in tensors for part in torch.chunk(t, self.parts)]

    def inverse_all(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat(list(tensors[i : i + self.parts])) for i in range(0, len(tensors), self.parts)]

    def shapes(self, shapes: Sequence[Shape]) -> list[Shape]:
        for shape in shapes:
            if shape[0] % self.parts:
                raise ValueError(f"dimension 0 of shape {list(shape)} does not split into {self.parts} equal parts")
        return [(shape[0] // self.parts, *shape[1:]) for shape in shapes for _ in range(self.parts)]


TRANSPOSE = Transpose()


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    diff = (a.float() - b.float()).abs()
    index = tuple(int(i) for i in torch.nonzero(a != b)[0])
    return f"max abs diff {diff.max().item():.3g}, first at index {index}"


@dataclass(frozen=True)
class Replicated:
    """Every rank stores the whole tensor (norms, row-parallel biases, a non-parallel embedding)."""

    n_sources = 1
    kind = "replicated"

    def resolve(self, dims: Any, layout: Any) -> Shard:
        return self

    def check(self, shapes: Sequence[Shape], tp: int) -> str | None:
        return None

    def local_shape(self, shapes: Sequence[Shape], tp: int) -> Shape:
        return shapes[0]

    def forward(self, sources: Sequence[torch.Tensor], tp: int, tp_rank: int) -> torch.Tensor:
        return sources[0]

    def inverse(self, locals_: Sequence[torch.Tensor], shapes: Sequence[Shape]) -> tuple[list[torch.Tensor], list[Problem]]:
        reference = locals_[0]
        problems = [
            (r, f"replicated copy differs from tp rank 0's ({_first_difference(t, reference)})")
            for r, t in enumerate(locals_)
            if r and not torch.equal(t, reference)
        ]
        return [reference], problems


@dataclass(frozen=True)
class Split:
    """Even split along `dim`: dim 0 is column-parallel, dim 1 row-parallel (TensorRT-LLM's `split`)."""

    dim: int
    n_sources = 1

    @property
    def kind(self) -> str:
        return {0: "column", 1: "row"}.get(self.dim, f"split{self.dim}")

    def resolve(self, dims: Any, layout: Any) -> Shard:
        return self

    def check(self, shapes: Sequence[Shape], tp: int) -> str | None:
        size = shapes[0][self.dim]
        if size % tp:
            return f"dimension {self.dim} of size {size} is not divisible by tp_size={tp}"
        return None

    def local_shape(self, shapes: Sequence[Shape], tp: int) -> Shape:
        shape = list(shapes[0])
        shape[self.dim] //= tp
        return tuple(shape)

    def forward(self, sources: Sequence[torch.Tensor], tp: int, tp_rank: int) -> torch.Tensor:
        return torch.chunk(sources[0], tp, dim=self.dim)[tp_rank]

    def inverse(self, locals_: Sequence[torch.Tensor], shapes: Sequence[Shape]) -> tuple[list[torch.Tensor], list[Problem]]:
        return [torch.cat(list(locals_), dim=self.dim)], []


@dataclass(frozen=True)
class VocabParallel:
    """Rows padded with zeros to a multiple of tp, then split on dim 0 (lm_head, embedding sharded on dim 0)."""

    n_sources = 1
    kind = "vocab"

    def check(self, shapes: Sequence[Shape], tp: int) -> str | None:
        return None

    def resolve(self, dims: Any, layout: Any) -> Shard:
        return self

    @staticmethod
    def padded_rows(rows: int, tp: int) -> int:
        return math.ceil(rows / tp) * tp

    def local_shape(self, shapes: Sequence[Shape], tp: int) -> Shape:
        rows, *rest = shapes[0]
        return (self.padded_rows(rows, tp) // tp, *rest)

    def forward(self, sources: Sequence[torch.Tensor], tp: int, tp_rank: int) -> torch.Tensor:
        source = sources[0]
        local_rows = self.padded_rows(source.shape[0], tp) // tp
        start = tp_rank * local_rows
        part = source[start : start + local_rows]
        if part.shape[0] == local_rows:
            return part
        padding = source.new_zeros((local_rows - part.shape[0], *source.shape[1:]))
        return torch.cat([part, padding])

    def inverse(self, locals_: Sequence[torch.Tensor], shapes: Sequence[Shape]) -> tuple[list[torch.Tensor], list[Problem]]:
        rows = shapes[0][0]
        local_rows = locals_[0].shape[0]
        problems = []
        for r, local in enumerate(locals_):
            first_pad = max(rows - r * local_rows, 0)
            padding = local[first_pad:]
            if padding.numel() and torch.count_nonzero(padding):
                bad = int(torch.nonzero(padding.reshape(padding.shape[0], -1).any(dim=1))[0]) + first_pad
                problems.append((r, f"padding row {r * local_rows + bad} (local row {bad}) is not zero"))
        return [torch.cat(list(locals_))[:rows]], problems


@dataclass(frozen=True)
class FusedQKV:
    """Separate q, k, v (weights or biases) -> per rank concat(q_r, k_r, v_r), each split by heads.

    When num_kv_heads < tp each KV head is repeated tp // num_kv_heads times first, replicas adjacent, so
    rank r holds KV head r // (tp // num_kv_heads) (TensorRT-LLM's `dup_kv_weight` followed by `split`).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    n_sources = 3
    kind = "qkv"

    def check(self, shapes: Sequence[Shape], tp: int) -> str | None:
        if self.num_heads % tp:
            return f"num_attention_heads={self.num_heads} is not divisible by tp_size={tp}"
        if self.num_kv_heads % tp and tp % self.num_kv_heads:
            return f"num_key_value_heads={self.num_kv_heads} neither divides nor is divisible by tp_size={tp}"
        return None

    def resolve(self, dims: Any, layout: Any) -> Shard:
        return self

    def local_kv_heads(self, tp: int) -> int:
        return max(self.num_kv_heads // tp, 1)

    def local_shape(self, shapes: Sequence[Shape], tp: int) -> Shape:
        rows = (self.num_heads // tp + 2 * self.local_kv_heads(tp)) * self.head_dim
        return (rows, *shapes[0][1:])

    def _kv_part(self, kv: torch.Tensor, tp: int, tp_rank: int) -> torch.Tensor:
        if self.num_kv_heads >= tp:
            return torch.chunk(kv, tp)[tp_rank]
        head = tp_rank // (tp // self.num_kv_heads)
        return kv[head * self.head_dim : (head + 1) * self.head_dim]

    def forward(self, sources: Sequence[torch.Tensor], tp: int, tp_rank: int) -> torch.Tensor:
        q, k, v = sources
        return torch.cat([torch.chunk(q, tp)[tp_rank], self._kv_part(k, tp, tp_rank), self._kv_part(v, tp, tp_rank)])

    def inverse(self, locals_: Sequence[torch.Tensor], shapes: Sequence[Shape]) -> tuple[list[torch.Tensor], list[Problem]]:
        tp = len(locals_)
        q_rows = self.num_heads // tp * self.head_dim
        kv_rows = self.local_kv_heads(tp) * self.head_dim
        parts = [torch.split(local, [q_rows, kv_rows, kv_rows]) for local in locals_]
        q = torch.cat([p[0] for p in parts])
        if self.num_kv_heads >= tp:
            return [q, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])], []
        reps = tp // self.num_kv_heads
        problems = []
        for r in range(tp):
            owner = r - r % reps  # the first rank holding this KV head
            for name, index in (("k", 1), ("v", 2)):
                if r != owner and not torch.equal(parts[r][index], parts[owner][index]):
                    detail = _first_difference(parts[r][index], parts[owner][index])
                    problems.append(
                        (r, f"{name} replica of KV head {r // reps} differs from tp rank {owner}'s ({detail})")
                    )
        heads = range(0, tp, reps)
        return [q, torch.cat([parts[r][1] for r in heads]), torch.cat([parts[r][2] for r in heads])], problems


COLUMN = Split(0)
ROW = Split(1)
REPLICATED = Replicated()
VOCAB = VocabParallel()


@dataclass(frozen=True)
class QKV:
    """Spec: fused QKV over the model's heads (`dims.num_heads`, `num_kv_heads`, `head_dim`)."""

    def resolve(self, dims: Any, layout: Any) -> Shard:
        return FusedQKV(dims.num_heads, dims.num_kv_heads, dims.head_dim)


@dataclass(frozen=True)
class Embedding:
    """Spec: the token embedding as the layout asks: replicated, vocab-parallel (padded rows) or split on dim 1."""

    def resolve(self, dims: Any, layout: Any) -> Shard:
        if not layout.use_parallel_embedding:
            return REPLICATED
        return VOCAB if layout.embedding_sharding_dim == 0 else ROW


QKV_SPEC = QKV()
EMBEDDING = Embedding()
