"""Transforms: how source tensors become one rank's tensor, and back. They know no architecture.

Two kinds, composed by a card's rows:
- a *source op* (`SourceOp`) changes the source tensors before sharding: a value transform such as a norm stored as
  `1 + weight`. `to_stored` is the one place that applies ops and the cast: ops that round run in float32 and
  the result is cast once; exact ops commute with the cast. `to_source` inverts them, and `round_trip` is what
  reassembly must give back, bit for bit.
- a *shard* turns the (stored) source tensors into the tensor one TP rank keeps, and all ranks' tensors back,
  reporting every way the rank tensors disagree with what the forward direction must have made (replicas that
  differ, padding that is not zero). A row names a shard directly, or a *spec* (`resolve(dims, layout)`) when
  the shard depends on the model's dimensions or the layout (fused QKV, the embedding).

Both are open sets: any object with these methods works; the built-in ones are below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

from .cast import cast

Shape = tuple[int, ...]
Problem = tuple[int, str]  # (tp_rank, what is wrong with that rank's tensor)
Slice = tuple[int, int, int]  # (dim, start, stop): a rank's tensor as one slice of its source (`rank_slice`)


def ceil_div(a: int, b: int) -> int:
    """⌈a / b⌉ in integers: exact for any size (a float division overflows past 1e308, which a hostile config
    reaches)."""
    return -(-a // b)


class Shard(Protocol):
    """Source tensors (already as stored) -> one TP rank's tensor, and every rank's tensors -> the sources.

    A shard whose rank tensor is one slice of its one source (a replica too) derives from `Sliced`: it gives the
    slice (`rank_slice`) and `Sliced.forward` takes it, which lets the converter stream it (converter/row_stream.py).
    """

    n_sources: int
    kind: str

    def check(self, shapes: Sequence[Shape], tp: int) -> str | None: ...

    def local_shape(self, shapes: Sequence[Shape], tp: int) -> Shape: ...

    def forward(self, sources: Sequence[torch.Tensor], tp: int, tp_rank: int) -> torch.Tensor: ...

    def inverse(self, locals_: Sequence[torch.Tensor], shapes: Sequence[Shape]) -> tuple[list[torch.Tensor], list[Problem]]:
        """The sources and what is wrong with `locals_` (every rank's tensor, in rank order); `locals_` may read
        a rank's tensor each time it is indexed (converter/reassemble.py `RankTensors`): index each rank once, rank
        0 as often as needed."""
        ...

    def resolve(self, dims: Any, layout: Any) -> "Shard": ...


class SourceOp(Protocol):
    """A transform of a row's source tensors before sharding; `exact` False means it rounds (run in float32).

    `forward_all` / `inverse_all` map the whole list (an op may turn one fused tensor into several and back);
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


def resolve_ops(ops: Sequence[Any], dims: Any, layout: Any) -> tuple[SourceOp, ...]:
    """A row's ops for this model: an op spec (one with `resolve`, e.g. a chunk sized by the heads) resolved
    against the dims and layout, a plain op as it is."""
    return tuple(op.resolve(dims, layout) if hasattr(op, "resolve") else op for op in ops)


def stored_shapes(ops: Sequence[SourceOp], shapes: Sequence[Shape]) -> tuple[Shape, ...]:
    """The shapes the shard receives: the source shapes mapped through the ops that change them."""
    out = list(shapes)
    for op in ops:
        out = op.shapes(out)
    return tuple(tuple(s) for s in out)


def to_stored(ops: Sequence[SourceOp], tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Source tensors as the checkpoint stores them, before sharding: ops that round run in float32 (as
    TensorRT-LLM does: "upcasted to float32 in case of bfloat16") and the result is cast to `dtype` once."""
    if all(op.exact for op in ops):
        out = [cast(t, dtype) for t in tensors]
        for op in ops:
            out = op.forward_all(out)
        return out
    out = [t.float() for t in tensors]
    for op in ops:
        out = op.forward_all(out)
    return [cast(t, dtype) for t in out]


def to_source(ops: Sequence[SourceOp], tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The inverse of `to_stored`, in the stored dtype: ops undone in reverse order (in float32 when one rounds)."""
    if all(op.exact for op in ops):
        out = list(tensors)
        for op in reversed(ops):
            out = op.inverse_all(out)
        return out
    out = [t.float() for t in tensors]
    for op in reversed(ops):
        out = op.inverse_all(out)
    dtype = tensors[0].dtype
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


TRANSPOSE = Transpose()


@dataclass(frozen=True)
class Chunk:
    """One fused source split on dim 0 into parts of `sizes` rows (weights and biases alike); the inverse
    concatenates them. Exact: it only moves values."""

    sizes: tuple[int, ...]
    name = "chunk"
    exact = True

    def forward_all(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        (fused,) = tensors
        return list(torch.split(fused, list(self.sizes)))

    def inverse_all(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat(list(tensors))]

    def shapes(self, shapes: Sequence[Shape]) -> list[Shape]:
        (shape,) = shapes
        if shape[0] != sum(self.sizes):
            raise ValueError(f"cannot chunk {shape[0]} rows into parts of {list(self.sizes)}")
        return [(size, *shape[1:]) for size in self.sizes]


@dataclass(frozen=True)
class EqualChunks:
    """One fused source split on dim 0 into `parts` equal parts (e.g. [gate; up]); the inverse concatenates."""

    parts: int
    name = "equal-chunks"
    exact = True

    def forward_all(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        (fused,) = tensors
        return list(torch.chunk(fused, self.parts))

    def inverse_all(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat(list(tensors))]

    def shapes(self, shapes: Sequence[Shape]) -> list[Shape]:
        (shape,) = shapes
        if shape[0] % self.parts:
            raise ValueError(f"cannot chunk {shape[0]} rows into {self.parts} equal parts")
        return [(shape[0] // self.parts, *shape[1:])] * self.parts


@dataclass(frozen=True)
class QKVParts:
    """Spec: a fused [q; k; v] source chunked by the model's heads (`dims.num_heads`, `num_kv_heads`, `head_dim`)."""

    def resolve(self, dims: Any, layout: Any) -> Chunk:
        kv = dims.num_kv_heads * dims.head_dim
        return Chunk((dims.num_heads * dims.head_dim, kv, kv))


@dataclass(frozen=True)
class Reorder:
    """Parts put in a new order: output i is input `order[i]`. Exact; the inverse restores the order."""

    order: tuple[int, ...]
    name = "reorder"
    exact = True

    def forward_all(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [tensors[i] for i in self.order]

    def inverse_all(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = [tensors[0]] * len(self.order)
        for position, i in enumerate(self.order):
            out[i] = tensors[position]
        return out

    def shapes(self, shapes: Sequence[Shape]) -> list[Shape]:
        return [shapes[i] for i in self.order]


QKV_PARTS = QKVParts()


class Sliced:
    """A shard whose rank tensor is one slice of its one source: `rank_slice(shape, tp, tp_rank)` for a source of
    at least one dimension says which, [start, stop) along dim, and `forward` takes it, followed by zeros along dim up
    to the rank's shape (`rank_shape`; a scalar source is taken whole). The converter streams a shard whose `forward`
    is this one (converter/row_stream.py); a subclass that overrides `forward` is applied whole."""

    def rank_slice(self, shape: Shape, tp: int, tp_rank: int) -> Slice:
        raise NotImplementedError

    def forward(self, sources: Sequence[torch.Tensor], tp: int, tp_rank: int) -> torch.Tensor:
        source = sources[0]
        if not source.dim():
            return source
        shape = tuple(source.shape)
        dim, start, stop = self.rank_slice(shape, tp, tp_rank)
        part = source.narrow(dim, start, stop - start)
        size = rank_shape(self, [shape], tp, tp_rank)[dim]
        if part.shape[dim] == size:
            return part
        zeros = list(part.shape)
        zeros[dim] = size - part.shape[dim]
        return torch.cat([part, part.new_zeros(zeros)], dim)


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    diff = (a.float() - b.float()).abs()
    index = tuple(int(i) for i in torch.nonzero(a != b)[0])
    return f"max abs diff {diff.max().item():.3g}, first at index {index}"


@dataclass(frozen=True)
class Replicated(Sliced):
    """Every rank stores the whole tensor (norms, row-parallel biases, a non-parallel embedding)."""

    n_sources = 1
    kind = "replicated"

    def resolve(self, dims: Any, layout: Any) -> Shard:
        return self

    def check(self, shapes: Sequence[Shape], tp: int) -> str | None:
        return None

    def local_shape(self, shapes: Sequence[Shape], tp: int) -> Shape:
        return shapes[0]

    def rank_slice(self, shape: Shape, tp: int, tp_rank: int) -> Slice:
        return (0, 0, shape[0])

    def inverse(self, locals_: Sequence[torch.Tensor], shapes: Sequence[Shape]) -> tuple[list[torch.Tensor], list[Problem]]:
        reference, problems = locals_[0], []
        for r in range(1, len(locals_)):
            copy = locals_[r]
            if not torch.equal(copy, reference):
                problems.append((r, f"replicated copy differs from tp rank 0's ({_first_difference(copy, reference)})"))
            del copy  # freed before the next rank's is read: one copy besides the reference at a time
        return [reference], problems


@dataclass(frozen=True)
class Split(Sliced):
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

    def rank_slice(self, shape: Shape, tp: int, tp_rank: int) -> Slice:
        width = shape[self.dim] // tp
        return (self.dim, tp_rank * width, (tp_rank + 1) * width)

    def inverse(self, locals_: Sequence[torch.Tensor], shapes: Sequence[Shape]) -> tuple[list[torch.Tensor], list[Problem]]:
        return [torch.cat(list(locals_), dim=self.dim)], []


@dataclass(frozen=True)
class VocabParallel(Sliced):
    """Rows padded with zeros to a multiple of tp, then split on dim 0 (lm_head, embedding sharded on dim 0)."""

    n_sources = 1
    kind = "vocab"

    def check(self, shapes: Sequence[Shape], tp: int) -> str | None:
        return None

    def resolve(self, dims: Any, layout: Any) -> Shard:
        return self

    @staticmethod
    def padded_rows(rows: int, tp: int) -> int:
        return ceil_div(rows, tp) * tp

    def local_shape(self, shapes: Sequence[Shape], tp: int) -> Shape:
        rows, *rest = shapes[0]
        return (self.padded_rows(rows, tp) // tp, *rest)

    def rank_slice(self, shape: Shape, tp: int, tp_rank: int) -> Slice:
        rows = shape[0]
        local_rows = self.padded_rows(rows, tp) // tp
        start = min(tp_rank * local_rows, rows)
        return (0, start, min(start + local_rows, rows))

    def inverse(self, locals_: Sequence[torch.Tensor], shapes: Sequence[Shape]) -> tuple[list[torch.Tensor], list[Problem]]:
        locals_ = list(locals_)  # each rank read once: the rows are checked, then concatenated
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


@dataclass(frozen=True)
class FusedColumn:
    """Parts fused along dim 0, each split column-parallel: rank r keeps concat(part_0_r, part_1_r, ...), so
    every rank holds its share of every part in the same order (a naive split of the concatenation would
    give rank 0 the first part only)."""

    n_sources: int
    kind = "fused-column"

    def resolve(self, dims: Any, layout: Any) -> Shard:
        return self

    def check(self, shapes: Sequence[Shape], tp: int) -> str | None:
        bad = [shape[0] for shape in shapes if shape[0] % tp]
        return f"dimension 0 of size {bad[0]} is not divisible by tp_size={tp}" if bad else None

    def local_shape(self, shapes: Sequence[Shape], tp: int) -> Shape:
        return (sum(shape[0] for shape in shapes) // tp, *shapes[0][1:])

    def forward(self, sources: Sequence[torch.Tensor], tp: int, tp_rank: int) -> torch.Tensor:
        return torch.cat([torch.chunk(part, tp)[tp_rank] for part in sources])

    def inverse(self, locals_: Sequence[torch.Tensor], shapes: Sequence[Shape]) -> tuple[list[torch.Tensor], list[Problem]]:
        tp = len(locals_)
        pieces = [torch.split(local, [shape[0] // tp for shape in shapes]) for local in locals_]
        return [torch.cat([p[i] for p in pieces]) for i in range(len(shapes))], []


@dataclass(frozen=True)
class CeilSplit(Sliced):
    """Rank r keeps slice [r * w, min((r + 1) * w, width)) of `dim`, w = ceil(width / tp): the last shard is smaller
    instead of padded (and a rank past the end keeps an empty slice). A 1-D tensor split on dim 1 and a width of 1
    are kept whole, as TensorRT-LLM's PyTorch backend does (`load_weight_shard`). `linear` refuses a width tp does
    not divide, as that backend's `Linear` asserts."""

    dim: int
    linear: bool = True
    n_sources = 1

    @property
    def kind(self) -> str:
        return {0: "ceil-column", 1: "ceil-row"}.get(self.dim, f"ceil-split{self.dim}")

    def resolve(self, dims: Any, layout: Any) -> Shard:
        return self

    def _whole(self, shape: Shape) -> bool:
        return self.dim >= len(shape) or shape[self.dim] == 1

    def check(self, shapes: Sequence[Shape], tp: int) -> str | None:
        shape = shapes[0]
        if self.linear and not self._whole(shape) and shape[self.dim] % tp:
            return f"dimension {self.dim} of size {shape[self.dim]} is not divisible by tp_size={tp}"
        return None

    def _bounds(self, width: int, tp: int, tp_rank: int) -> tuple[int, int]:
        step = ceil_div(width, tp)
        return min(tp_rank * step, width), min((tp_rank + 1) * step, width)

    def rank_shape(self, shapes: Sequence[Shape], tp: int, tp_rank: int) -> Shape:
        shape = list(shapes[0])
        if not self._whole(shapes[0]):
            start, end = self._bounds(shape[self.dim], tp, tp_rank)
            shape[self.dim] = end - start
        return tuple(shape)

    def local_shape(self, shapes: Sequence[Shape], tp: int) -> Shape:
        return self.rank_shape(shapes, tp, 0)

    def rank_slice(self, shape: Shape, tp: int, tp_rank: int) -> Slice:
        if self._whole(shape):
            return (0, 0, shape[0])
        return (self.dim, *self._bounds(shape[self.dim], tp, tp_rank))

    def inverse(self, locals_: Sequence[torch.Tensor], shapes: Sequence[Shape]) -> tuple[list[torch.Tensor], list[Problem]]:
        if self._whole(shapes[0]):
            return Replicated().inverse(locals_, shapes)
        return [torch.cat(list(locals_), dim=self.dim)], []


def rank_shape(shard: Shard, shapes: Sequence[Shape], tp: int, tp_rank: int) -> Shape:
    """The shape of TP rank `tp_rank`'s tensor: the same on every rank, unless the shard says otherwise
    (`rank_shape`, e.g. `CeilSplit`'s smaller last shard)."""
    per_rank = getattr(shard, "rank_shape", None)
    return per_rank(shapes, tp, tp_rank) if per_rank else shard.local_shape(shapes, tp)


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


@dataclass(frozen=True)
class StackedExperts:
    """Per-expert matrices -> per rank the stack over the rank's experts, each expert's matrix split on `dim`.

    The sources are `groups` blocks of `num_experts` matrices each (`[a_0 .. a_{E-1}, b_0 .. b_{E-1}]`); per
    expert the groups' `moe_tp` splits are concatenated on `dim` (`[a_e split; b_e split]`), and the experts
    the rank holds are stacked on a new dim 0. TP rank r is expert rank r % moe_ep, holding experts
    [ep_rank * E / moe_ep, (ep_rank + 1) * E / moe_ep), and expert-TP rank r // moe_ep (TensorRT-LLM's
    `Mapping.moe_ep_rank`, `moe_tp_rank`, `ep_experts`). Every piece lives on exactly one rank (moe_tp * moe_ep
    = tp), so there are no replicas for the inverse to compare.
    """

    num_experts: int
    groups: int
    dim: int
    moe_tp: int
    moe_ep: int
    kind = "experts"

    @property
    def n_sources(self) -> int:
        return self.groups * self.num_experts

    def resolve(self, dims: Any, layout: Any) -> Shard:
        return self

    def check(self, shapes: Sequence[Shape], tp: int) -> str | None:
        if self.num_experts % self.moe_ep:
            return f"num_experts={self.num_experts} is not divisible by moe_ep_size={self.moe_ep}"
        size = shapes[0][self.dim]
        if size % self.moe_tp:
            return f"intermediate_size={size} is not divisible by moe_tp_size={self.moe_tp}"
        return None

    def local_shape(self, shapes: Sequence[Shape], tp: int) -> Shape:
        shape = list(shapes[0])
        shape[self.dim] = shape[self.dim] // self.moe_tp * self.groups
        return (self.num_experts // self.moe_ep, *shape)

    def local_experts(self, tp_rank: int) -> range:
        per_rank = self.num_experts // self.moe_ep
        ep_rank = tp_rank % self.moe_ep
        return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)

    def forward(self, sources: Sequence[torch.Tensor], tp: int, tp_rank: int) -> torch.Tensor:
        moe_tp_rank, E = tp_rank // self.moe_ep, self.num_experts
        return torch.stack([
            torch.cat([torch.chunk(sources[g * E + e], self.moe_tp, dim=self.dim)[moe_tp_rank] for g in range(self.groups)],
                      dim=self.dim)
            for e in self.local_experts(tp_rank)
        ])

    def inverse(self, locals_: Sequence[torch.Tensor], shapes: Sequence[Shape]) -> tuple[list[torch.Tensor], list[Problem]]:
        pieces: dict[tuple[int, int], list[torch.Tensor]] = {}  # (group, expert) -> its splits by moe_tp rank
        for moe_tp_rank in range(self.moe_tp):
            for ep_rank in range(self.moe_ep):
                tp_rank = moe_tp_rank * self.moe_ep + ep_rank
                for local, e in zip(locals_[tp_rank], self.local_experts(tp_rank)):
                    for g, part in enumerate(torch.chunk(local, self.groups, dim=self.dim)):
                        pieces.setdefault((g, e), []).append(part)
        return [torch.cat(pieces[(g, e)], dim=self.dim) for g in range(self.groups) for e in range(self.num_experts)], []


@dataclass(frozen=True)
class Experts:
    """Spec: stacked experts over `dims.num_experts`, split as the layout's mapping says (moe_tp_size,
    moe_ep_size); `groups` source blocks concatenated per expert on `dim` of each expert's matrix."""

    groups: int
    dim: int

    def resolve(self, dims: Any, layout: Any) -> Shard:
        mapping = layout.mapping
        return StackedExperts(dims.num_experts, self.groups, self.dim, mapping.moe_tp_size, mapping.moe_ep_size)
