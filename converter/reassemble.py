"""The reassembler, the plan's exact inverse: runs every shard's and op's inverse over the rank files and writes
the HF checkpoint back."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .atomic import atomic_directory
from .checkpoint import TRTCheckpoint, Violation
from .target import Target
from .target_checkpoint import open_checkpoint
from .planned_file import PlannedFile
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

    Every inverse checks what it can: KV replicas identical across ranks, padding rows zero, replicated
    tensors identical, tied copies identical; structural faults (missing/extra files or tensors, wrong
    shapes or dtypes) are found from the headers first and stop the rebuild. `progress` is called with each
    target tensor's name and the bytes of its shards read.
    """
    ckpt = open_checkpoint(checkpoint_dir, target, model_dir)
    result = Reassembly(ckpt, None, ckpt.structural_violations())
    if result.violations:
        return result
    plan, mapping = ckpt.plan, ckpt.mapping
    groups = plan.groups()
    uses = Counter(name for group in groups for name in group[0].sources)
    dtypes = {name: group[0].torch_dtype for group in groups for name in group[0].sources}
    kept: dict[str, tuple[str, torch.Tensor]] = {}
    with atomic_directory(Path(output_dir), overwrite, inputs=[Path(checkpoint_dir)]) as staging:
        with PlannedFile(staging / HF_WEIGHTS, [(n, d, ckpt.source_shapes[n]) for n, d in dtypes.items()]) as writer:
            for group in groups:
                head = group[0]
                pp_rank = head.pp_rank
                locals_ = [ckpt.load(mapping.rank(t.tp_rank, pp_rank), t.name) for t in group]
                sources, problems = head.shard.inverse(locals_, head.stored_shapes)
                sources = to_source(head.ops, sources)
                result.violations += [Violation(mapping.rank(r, pp_rank), head.name, p) for r, p in problems]
                for name, tensor in zip(head.sources, sources):
                    if name in kept:
                        first_target, first = kept[name]
                        if not torch.equal(first, tensor):
                            result.violations.append(
                                Violation(mapping.rank(0, pp_rank), head.name, f"is tied to {first_target} but differs from it")
                            )
                        continue
                    if uses[name] > 1:
                        kept[name] = (head.name, tensor)
                    writer.write(name, tensor)
                if progress:
                    progress(head.name, sum(t.numel() * t.element_size() for t in locals_))
        (staging / "config.json").write_text(json.dumps(ckpt.hf_config(), indent=2) + "\n")
    result.output_dir = Path(output_dir)
    return result
