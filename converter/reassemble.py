"""The reassembler, the plan's exact inverse: runs every shard's and op's inverse over the rank files and writes
the HF checkpoint back."""

from __future__ import annotations

import functools
import json
import math
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from .atomic import atomic_directory
from .checkpoint import TRTCheckpoint, Violation
from .formats.hf import auto_config
from .loaders import SourceConfig, TensorInfo, Weights
from .plan import PlannedTensor
from .planned_file import PlannedFile
from .source import Source
from .target import Target
from .target_checkpoint import open_checkpoint
from .transforms import to_source

HF_WEIGHTS = "model.safetensors"


@dataclass
class Reassembly:
    """What reassembly found; `output_dir` is None when the rank files were too broken to rebuild from."""

    checkpoint: TRTCheckpoint
    output_dir: Path | None
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


def reassemble(
    checkpoint_dir: Path | str,
    output_dir: Path | str,
    overwrite: bool = False,
    progress: Callable[[str, int], None] | None = None,
    target: str | Target | None = None,
    model_dir: Path | str | None = None,
) -> Reassembly:
    """Rebuild the HF checkpoint (config.json + model.safetensors) from the rank files of `target` (default: a
    TensorRT-LLM checkpoint, from its files alone; a target without its config.json takes the source's config from
    its rank metadata, or from `model_dir`).

    Every inverse checks what it can (`rebuild`); structural faults (missing/extra files or tensors, wrong shapes
    or dtypes) are found from the headers first and stop the rebuild. `progress` is called with each target
    tensor's name and the bytes of its shards read.
    """
    ckpt = open_checkpoint(checkpoint_dir, target, model_dir)
    result = Reassembly(ckpt, None, ckpt.structural_violations())
    if result.violations:
        return result
    dtypes = {name: group[0].torch_dtype for group in ckpt.plan.groups() for name in group[0].sources}
    with atomic_directory(Path(output_dir), overwrite, inputs=[Path(checkpoint_dir)]) as staging:
        with PlannedFile(staging / HF_WEIGHTS, [(n, d, ckpt.source_shapes[n]) for n, d in dtypes.items()]) as writer:
            for name, tensor, _ in rebuild(ckpt, result.violations, progress=progress):
                writer.write(name, tensor)
        (staging / "config.json").write_text(json.dumps(ckpt.hf_config(), indent=2) + "\n")
    result.output_dir = Path(output_dir)
    return result


RankLoad = Callable[[int, str, "torch.device | None"], torch.Tensor]  # (rank, tensor name, device) -> as stored


def inverted_on(group: list[PlannedTensor], device: torch.device | None) -> torch.device | None:
    """Where `invert_group` reads and inverts `group` for `device`: there, unless its ops round (then the host,
    where conversion computed them, since another device may round otherwise)."""
    return device if device is not None and all(op.exact for op in group[0].ops) else None


def invert_group(ckpt: TRTCheckpoint, group: list[PlannedTensor], device: torch.device | None = None,
                 load: RankLoad | None = None) -> tuple[list[torch.Tensor], list[Violation], int]:
    """The source tensors one TP group's rank tensors give back (in `group[0].sources` order), the problems its
    inverse found, and the bytes read. `device`: where to read and invert (None: the host; `inverted_on`);
    `load` reads a rank tensor (default `ckpt.load`)."""
    head = group[0]
    where, load = inverted_on(group, device), load or ckpt.load
    locals_ = RankTensors([functools.partial(load, ckpt.mapping.rank(t.tp_rank, head.pp_rank), t.name, where)
                           for t in group])
    sources, problems = head.shard.inverse(locals_, head.stored_shapes)
    sources = to_source(head.ops, sources)
    violations = [Violation(ckpt.mapping.rank(r, head.pp_rank), head.name, p) for r, p in problems]
    return sources, violations, sum(math.prod(t.shape) * t.torch_dtype.itemsize for t in group)


class RankTensors(Sequence[torch.Tensor]):
    """One TP group's rank tensors, each read when asked for and not kept (but rank 0's), so that a replica's
    inverse holds two copies at a time, not one a rank (`Shard.inverse` asks for each other rank once)."""

    def __init__(self, loads: list[Callable[[], torch.Tensor]]) -> None:
        self._loads, self._first = loads, None

    def __len__(self) -> int:
        return len(self._loads)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        index = range(len(self))[index]  # IndexError past the end, which ends iteration
        if index:
            return self._loads[index]()
        if self._first is None:
            self._first = self._loads[0]()
        return self._first


class Rebuild:
    """Source tensors given back from the rank files one TP group at a time, each once, in any order of groups;
    what the inverses find is appended to `violations` on the way: KV replicas identical across ranks, padding
    rows zero, replicated tensors identical, tied copies identical (a tied tensor is kept until every group using
    it has been inverted). `device` and `load` as `invert_group`'s."""

    def __init__(self, ckpt: TRTCheckpoint, violations: list[Violation], device: torch.device | None = None,
                 load: RankLoad | None = None) -> None:
        self.ckpt, self.violations, self.device, self.load = ckpt, violations, device, load
        self._uses = Counter(name for group in ckpt.plan.groups() for name in group[0].sources)
        self._kept: dict[str, tuple[str, torch.Tensor]] = {}

    def kept(self, name: str) -> torch.Tensor | None:
        """Tied tensor `name` as first given back, if it was."""
        return self._kept[name][1] if name in self._kept else None

    def group(self, group: list[PlannedTensor]) -> tuple[list[tuple[str, torch.Tensor]], int]:
        """The source tensors `group` gives back that no group gave before (a tied one given again is compared
        with its first copy instead), and the bytes read."""
        head = group[0]
        sources, problems, nbytes = invert_group(self.ckpt, group, self.device, self.load)
        self.violations += problems
        given = []
        for name, tensor in zip(head.sources, sources):
            if name in self._kept:
                first_target, first = self._kept[name]
                if not torch.equal(first, tensor.to(first.device)):
                    rank = self.ckpt.mapping.rank(0, head.pp_rank)
                    self.violations.append(Violation(rank, head.name, f"is tied to {first_target} but differs from it"))
                continue
            if self._uses[name] > 1:
                self._kept[name] = (head.name, tensor)
            given.append((name, tensor))
        return given, nbytes


def rebuild(
    ckpt: TRTCheckpoint,
    violations: list[Violation],
    device: torch.device | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> Iterator[tuple[str, torch.Tensor, list[PlannedTensor]]]:
    """Every source tensor the rank files give back, once each, in plan order, with the group that made it
    (`Rebuild`: what the inverses find is appended to `violations`); `progress` as `reassemble`'s."""
    groups = Rebuild(ckpt, violations, device)
    for group in ckpt.plan.groups():
        given, nbytes = groups.group(group)
        for name, tensor in given:
            yield name, tensor, group
        if progress:
            progress(group[0].name, nbytes)


class ReassembledWeights(Weights):
    """The source tensors reassembly gives back, inverted from the rank files when asked for, nothing written:
    `reassemble`'s output for readers that take each tensor once per pass (streamed model runs). The tensors of a
    group are kept until each has been taken (fused q/k/v are asked for one by one). Problems the inverses find
    are not judged here: `rebuild` reports them."""

    def __init__(self, ckpt: TRTCheckpoint):
        self._ckpt = ckpt
        self._groups: dict[str, list[PlannedTensor]] = {}
        for group in ckpt.plan.groups():
            for name in group[0].sources:
                self._groups.setdefault(name, group)
        self.tensors = {name: TensorInfo(group[0].torch_dtype, tuple(ckpt.source_shapes[name]))
                        for name, group in self._groups.items()}
        self.files = tuple(ckpt.rank_path(rank.rank) for rank in ckpt.plan.ranks)
        self._pending: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def where(self, name: str) -> Path:
        head = self._groups[name][0]
        return self._ckpt.rank_path(self._ckpt.mapping.rank(head.tp_rank, head.pp_rank))

    def load(self, name: str) -> torch.Tensor:
        return self._take(name, None)

    def load_to(self, name: str, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = self._take(name, device).to(device)
        return tensor if dtype is None else tensor.to(dtype)

    def _take(self, name: str, device: torch.device | None) -> torch.Tensor:
        with self._lock:
            if name not in self._pending:
                group = self._groups[name]
                sources, _, _ = invert_group(self._ckpt, group, device)
                self._pending.update(zip(group[0].sources, sources))
            return self._pending.pop(name)


def reassembled_source(ckpt: TRTCheckpoint, config_dir: Path) -> Source:
    """The model the rank files hold as a `Source` (config as `reassemble` writes it, into `config_dir`; tensors
    `ReassembledWeights`): verification runs it without writing the weights back."""
    fields = ckpt.hf_config()
    path = Path(config_dir) / "config.json"
    path.write_text(json.dumps(fields, indent=2) + "\n")
    config = SourceConfig(fields, (path,), lambda: auto_config(Path(config_dir), path))
    return Source(Path(config_dir), "reassembled", None, config, ReassembledWeights(ckpt))
