"""A TensorRT-LLM checkpoint directory as the reassembler sees it: config.json, its plan (rebuilt from config.json
alone through the card), rank file headers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .card import Card, Dims, get_card
from .dtypes import safetensors_code
from .errors import ShardproofError
from .execute import rank_file
from .json_files import read_config
from .mapping import Mapping
from .plan import Layout, Plan, build_plan, expected_source_shapes
from .safetensors_io import Shape, TensorReader, read_header


@dataclass(frozen=True)
class Violation:
    """One way the checkpoint is not what the plan says it must be."""

    rank: int | None
    tensor: str
    problem: str

    def __str__(self) -> str:
        where = f"rank {self.rank}" if self.rank is not None else "checkpoint"
        return f"{where}: {self.tensor}: {self.problem}"


# The plan expands num_layers over the ranks (and over gathered instances such as experts) before any rank file is
# read: bound it, so that a config.json claiming 10**12 layers is refused instead of planned. Real checkpoints stay
# far below (126 layers x 128 ranks; 61 layers x 256 experts).
MAX_EXPANSION = 2**15


def _refuse_implausible_size(card: Card, dims: Dims, mapping: Mapping) -> None:
    """ShardproofError when num_layers times the world size, or times a count the card's rows gather over, exceeds
    MAX_EXPANSION."""
    counts = {"world_size": mapping.world_size, **{f: getattr(dims, f) for row in card.rows for _, f in row.gather}}
    for name, count in counts.items():
        if dims.num_layers * count > MAX_EXPANSION:
            raise ShardproofError(f"num_layers={dims.num_layers} times {name}={count} is implausible "
                                  f"(more than {MAX_EXPANSION} layer instances to plan)")


class TRTCheckpoint:
    """config.json and rank files of a TensorRT-LLM checkpoint; the plan is rebuilt from config.json alone."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        config_path, self.config = read_config(self.directory, "checkpoint")
        try:
            if not isinstance(self.config["mapping"], dict):
                raise ShardproofError("'mapping' must be an object")
            self.card: Card = get_card(self.config["architecture"])
            self.dims = self.card.config.dims_from_trt(self.config)
            self.card.config.hf_config(self.config)  # every field the reassembler writes back exists, before any work
            for key in ("use_parallel_embedding", "share_embedding_table"):
                if type(self.config.get(key, False)) is not bool:
                    raise ShardproofError(f"{key}={self.config[key]!r} must be true or false")
            if type(self.config.get("embedding_sharding_dim", 0)) is not int:
                raise ShardproofError(f"embedding_sharding_dim={self.config['embedding_sharding_dim']!r} must be an integer")
            self.layout = Layout(
                dtype=self.config["dtype"],
                mapping=Mapping.from_config(self.config["mapping"]),
                use_parallel_embedding=self.config.get("use_parallel_embedding", False),
                embedding_sharding_dim=self.config.get("embedding_sharding_dim", 0),
                share_embedding_table=self.config.get("share_embedding_table", False),
            )
            _refuse_implausible_size(self.card, self.dims, self.layout.mapping)
        except KeyError as e:
            raise ShardproofError(f"{config_path}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as e:  # a field of the wrong type (null, a list, a string)
            raise ShardproofError(f"{config_path}: a field has the wrong type ({e})") from None
        except ShardproofError as e:
            raise ShardproofError(f"{config_path}: {e}") from None
        self.source_shapes = expected_source_shapes(self.card, self.dims, self.layout)
        self.plan: Plan = build_plan(self.card, self.dims, self.layout, self.source_shapes, str(config_path))
        self._readers: dict[int, TensorReader] = {}

    @property
    def mapping(self) -> Mapping:
        return self.layout.mapping

    def hf_config(self) -> dict:
        """The HF config.json that reassembly writes back."""
        return self.card.config.hf_config(self.config)

    def rank_path(self, rank: int) -> Path:
        return self.directory / rank_file(rank)

    def headers(self, rank: int) -> dict[str, tuple[str, Shape]] | None:
        """The rank file's header, or None when the file does not exist."""
        path = self.rank_path(rank)
        return read_header(path) if path.exists() else None

    def structural_violations(self) -> list[Violation]:
        """Missing or extra rank files and tensors, and tensors whose shape or dtype differs from the plan."""
        violations = []
        for rank_plan in self.plan.ranks:
            headers = self.headers(rank_plan.rank)
            if headers is None:
                violations.append(Violation(rank_plan.rank, rank_file(rank_plan.rank), "rank file is missing"))
                continue
            for tensor in rank_plan.tensors:
                if tensor.name not in headers:
                    violations.append(Violation(rank_plan.rank, tensor.name, "tensor is missing"))
                    continue
                dtype, shape = headers.pop(tensor.name)
                if tuple(shape) != tensor.shape:
                    violations.append(Violation(rank_plan.rank, tensor.name, f"shape {list(shape)}, expected {list(tensor.shape)}"))
                code = safetensors_code(tensor.torch_dtype)
                if dtype != code:
                    violations.append(Violation(rank_plan.rank, tensor.name, f"dtype {dtype}, expected {code}"))
            violations += [Violation(rank_plan.rank, name, "unexpected extra tensor") for name in headers]
        extra_ranks = sorted(
            p.name for p in self.directory.glob("rank*.safetensors")
            if p.stem[4:].isdigit() and int(p.stem[4:]) >= self.mapping.world_size
        )
        violations += [Violation(None, name, f"rank file beyond world_size={self.mapping.world_size}") for name in extra_ranks]
        return violations

    def load(self, rank: int, name: str, device: torch.device | None = None) -> torch.Tensor:
        """Tensor `name` of rank file `rank`, on `device` (None: the host)."""
        if rank not in self._readers:
            self._readers[rank] = TensorReader(self.rank_path(rank))
        reader = self._readers[rank]
        return reader.read(name) if device is None else reader.read_to(name, device)
