"""A catalog of realistic conversion faults, each a function that rewrites a correct conversion.

Every mutant is what a buggy converter would write: it edits the rank files of a correct checkpoint, reading the
source model where the buggy converter would (or, for a fault of the input rather than the mapping, edits the
source model before conversion), and keeps every tensor's name, shape and dtype unless the fault itself cannot
(then the runtime and the reassembler reject it structurally). Mutants know no architecture: a mutant declares
the layout it needs and is injected into a conversion of any registered card; one that finds nothing of its
kind to break in that card's checkpoint (no bias, no op that rounds, too few KV heads) raises NotApplicable.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from shardproof.converter.checkpoint import TRTCheckpoint
from shardproof.converter.source import open_source
from shardproof.converter.card import get_card
from shardproof.converter.transforms import VOCAB, SourceOp, Transpose, ceil_div, to_stored

from .runtime.config import RuntimeConfig, load_config

RankFiles = list[dict[str, Tensor]]
Edit = Callable[[Path, Path], None]  # (directory rewritten in place, the source model directory)


class NotApplicable(Exception):
    """The mutant has nothing of its kind to break in this checkpoint; the message says what it needs."""


@dataclass(frozen=True)
class Setup:
    """A card's self-test model (its tiny config with every optional feature on), the conversion layout and the
    target it is laid out in."""

    architecture: str
    dtype: str = "float32"
    tp_size: int = 1
    pp_size: int = 1
    target: str = "trtllm-checkpoint"

    def __str__(self) -> str:
        where = "" if self.target == "trtllm-checkpoint" else f" {self.target}"
        return f"{self.architecture} {self.dtype} tp{self.tp_size} pp{self.pp_size}{where}"


@dataclass(frozen=True)
class Layout:
    """The conversion a mutant is injected into."""

    dtype: str = "float32"
    tp_size: int = 1
    pp_size: int = 1

    def on(self, architecture: str, target: str = "trtllm-checkpoint") -> Setup:
        return Setup(architecture, self.dtype, self.tp_size, self.pp_size, target)


@dataclass(frozen=True)
class Mutant:
    """One fault: what the buggy converter does, in which layout, and where the sharded check must localize it.

    `edit(directory, source_dir)` rewrites the checkpoint directory in place, or a copy of the source model
    before conversion when `target` is "source". `diverges_at` is the stage the sharded check must name
    ("structure" when the fault changes a shape, which the runtime rejects before running). `rank_target` is the
    layout of the rank files it rewrites (`PYTORCH_CATALOG`'s are the PyTorch backend's).
    """

    name: str
    fault: str
    layout: Layout
    edit: Edit
    diverges_at: str
    target: Literal["checkpoint", "source"] = "checkpoint"
    rank_target: str = "trtllm-checkpoint"  # the rank-file layout (converter/target.py) it is injected into
    at_stage_boundary: bool = False  # diverges_at is the first layer of the second pipeline stage

    def on_model(self, tp_size: int, num_layers: int) -> Mutant:
        """This mutant for a model the catalog's layouts do not fit (a trained one's head count): split over
        `tp_size` ranks wherever the catalog splits over several; a fault at a pipeline boundary found at the
        first layer of the second stage of `num_layers` (the first stages take the extra layers)."""
        layout = dataclasses.replace(self.layout, tp_size=tp_size) if self.layout.tp_size > 1 else self.layout
        diverges_at = f"layer {ceil_div(num_layers, layout.pp_size)}" if self.at_stage_boundary else self.diverges_at
        return dataclasses.replace(self, layout=layout, diverges_at=diverges_at)

    def applies_to(self, target: str) -> bool:
        """Whether the mutant can be injected into a conversion laid out in `target`: it rewrites that target's
        rank files, or it edits the source model (any target's conversion of it carries the fault)."""
        return self.target == "source" or self.rank_target == target


def _rewrite_ranks(checkpoint_dir: Path, edit: Callable[[RankFiles, RuntimeConfig], None]) -> None:
    """Load every rank file, let `edit` change them, save them; NotApplicable when nothing changed."""
    cfg = load_config(checkpoint_dir / "config.json")
    paths = [checkpoint_dir / f"rank{r}.safetensors" for r in range(cfg.world_size)]
    files = [load_file(p) for p in paths]
    before = [dict(f) for f in files]
    edit(files, cfg)
    if all(f.keys() == b.keys() and all(torch.equal(f[k], b[k]) for k in f) for f, b in zip(files, before)):
        raise NotApplicable("found nothing of its kind to change in this checkpoint")
    for path, tensors in zip(paths, files):
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def rank_edit(edit: Callable[[RankFiles, RuntimeConfig], None]) -> Edit:
    """Turn `edit(files, cfg)`, which changes the loaded rank files in place, into a checkpoint rewrite."""

    @functools.wraps(edit)
    def rewrite(checkpoint_dir: Path, source_dir: Path) -> None:
        _rewrite_ranks(checkpoint_dir, edit)

    return rewrite


def _qkv_parts(t: Tensor, cfg: RuntimeConfig) -> tuple[Tensor, ...]:
    hd = cfg.head_size
    return t.split([cfg.q_heads_per_rank * hd, cfg.kv_heads_per_rank * hd, cfg.kv_heads_per_rank * hd])


def _qkv(files: RankFiles) -> list[tuple[dict[str, Tensor], str]]:
    return [(f, name) for f in files for name in f if name.endswith(("attention.qkv.weight", "attention.qkv.bias"))]


@rank_edit
def swap_gate_up(files: RankFiles, cfg: RuntimeConfig) -> None:
    """HF gate_proj written as `mlp.gate` and up_proj as `mlp.fc` (GatedMLP is act(fc(x)) * gate(x)); with a
    fused swiglu fc (one expert's or each expert's), each rank's halves swapped to [gate_r; up_r]."""
    for f in files:
        for name in [n for n in f if ".mlp.fc." in n]:
            other = name.replace(".mlp.fc.", ".mlp.gate.")
            if other in f:
                f[name], f[other] = f[other], f[name]
            elif cfg.hidden_act == "swiglu":
                dim = -2 if f[name].dim() > 1 else 0
                first, second = f[name].chunk(2, dim=dim)
                f[name] = torch.cat([second, first], dim=dim)


@rank_edit
def qkv_as_kqv(files: RankFiles, cfg: RuntimeConfig) -> None:
    """Each rank's fused qkv concatenated as [k; q; v] (weight and bias alike)."""
    for f, name in _qkv(files):
        q, k, v = _qkv_parts(f[name], cfg)
        f[name] = torch.cat([k, q, v])


@rank_edit
def reverse_q_heads(files: RankFiles, cfg: RuntimeConfig) -> None:
    """Each rank's q heads stored in reverse order (a head-major reshape read backwards)."""
    for f, name in _qkv(files):
        q, k, v = _qkv_parts(f[name], cfg)
        q = q.reshape(cfg.q_heads_per_rank, cfg.head_size, *q.shape[1:]).flip(0).reshape(q.shape)
        f[name] = torch.cat([q, k, v])


@rank_edit
def kv_from_next_head(files: RankFiles, cfg: RuntimeConfig) -> None:
    """tp > num_kv_heads: rank r stores KV head (r // reps + 1) % nkv instead of r // reps, the same on every
    replica (an off-by-one in the head index), so the replicas still agree with each other."""
    reps = cfg.tp_size // cfg.num_kv_heads
    if reps < 2 or cfg.num_kv_heads < 2:
        raise NotApplicable("needs tp_size > num_key_value_heads >= 2")
    for pp in range(cfg.pp_size):
        stage = files[pp * cfg.tp_size : (pp + 1) * cfg.tp_size]
        original = [dict(f) for f in stage]
        for r, f in enumerate(stage):
            source = original[(r // reps + 1) % cfg.num_kv_heads * reps]
            for _, name in _qkv([f]):
                q, _, _ = _qkv_parts(f[name], cfg)
                _, k, v = _qkv_parts(source[name], cfg)
                f[name] = torch.cat([q, k, v])


@rank_edit
def dense_not_transposed(files: RankFiles, cfg: RuntimeConfig) -> None:
    """attention.dense stored as HF's o_proj transposed (a Conv1D-style transpose applied to a Linear)."""
    if cfg.tp_size != 1 or cfg.hidden_size != cfg.num_heads * cfg.head_size:
        raise NotApplicable("needs tp_size 1 and hidden_size == heads * head_dim (a square weight)")
    for f in files:
        for name in [n for n in f if n.endswith("attention.dense.weight")]:
            f[name] = f[name].T


@rank_edit
def fc_split_on_dim1(files: RankFiles, cfg: RuntimeConfig) -> None:
    """mlp.fc (column-parallel) split along dim 1, as a row-parallel tensor: its shape changes."""
    for pp in range(cfg.pp_size):
        stage = files[pp * cfg.tp_size : (pp + 1) * cfg.tp_size]
        for name in [n for n in stage[0] if n.endswith("mlp.fc.weight")]:
            full = torch.cat([f[name] for f in stage])
            for r, f in enumerate(stage):
                f[name] = full.chunk(cfg.tp_size, dim=1)[r]


@rank_edit
def experts_swapped(files: RankFiles, cfg: RuntimeConfig) -> None:
    """Two experts swapped in every stacked expert tensor (the 3-D ones: [experts, out, in]): local experts 0
    and 1 of each rank trade places in fc and proj alike, so the router's choice runs the other expert."""
    for f in files:
        for name in [n for n, t in f.items() if t.dim() == 3 and t.shape[0] >= 2]:
            f[name] = f[name][[1, 0, *range(2, f[name].shape[0])]]


@rank_edit
def lm_head_padded_in_front(files: RankFiles, cfg: RuntimeConfig) -> None:
    """lm_head padded with its zero rows first, so every real row moves down by the padding."""
    last = files[-cfg.tp_size :]
    if "lm_head.weight" not in last[0]:
        raise NotApplicable("needs an lm_head (this layout shares the embedding table)")
    full = torch.cat([f["lm_head.weight"] for f in last])[: cfg.vocab_size]
    padding = cfg.vocab_per_rank * cfg.tp_size - cfg.vocab_size
    if not padding:
        raise NotApplicable("needs a vocab_size not divisible by tp_size")
    padded = torch.cat([full.new_zeros(padding, full.shape[1]), full])
    for r, f in enumerate(last):
        f["lm_head.weight"] = padded.chunk(cfg.tp_size)[r]


@rank_edit
def stages_start_one_layer_early(files: RankFiles, cfg: RuntimeConfig) -> None:
    """Every stage after the first starts one layer early (an inclusive/exclusive boundary mix-up): it repeats
    the previous stage's last layer and the model's last layer is lost; names and counts are unchanged."""
    if cfg.pp_size < 2:
        raise NotApplicable("needs pp_size >= 2")
    where = {g: (pp, j) for pp in range(cfg.pp_size) for j, g in enumerate(cfg.stage_layers(pp))}
    original = [dict(f) for f in files]
    for pp in range(1, cfg.pp_size):
        for j, g in enumerate(cfg.stage_layers(pp)):
            from_pp, from_j = where[g - 1]
            for t in range(cfg.tp_size):
                src = original[from_pp * cfg.tp_size + t]
                prefix, from_prefix = f"transformer.layers.{j}.", f"transformer.layers.{from_j}."
                for name in [n for n in files[pp * cfg.tp_size + t] if n.startswith(prefix)]:
                    files[pp * cfg.tp_size + t][name] = src[from_prefix + name[len(prefix) :]]


@rank_edit
def dense_bias_divided_by_tp(files: RankFiles, cfg: RuntimeConfig) -> None:
    """attention.dense.bias stored as bias / tp on every rank, as if the runtime added it on each rank before
    the all-reduce; TensorRT-LLM adds the full bias once after it, so the layer gets bias / tp."""
    for f in files:
        for name in [n for n in f if n.endswith("attention.dense.bias")]:
            f[name] = f[name] / cfg.tp_size


@rank_edit
def lm_head_from_embedding(files: RankFiles, cfg: RuntimeConfig) -> None:
    """An untied model's lm_head written from the embedding (the tied-model path taken regardless)."""
    if cfg.use_parallel_embedding:
        raise NotApplicable("needs a replicated embedding")
    embedding = files[0]["transformer.vocab_embedding.weight"]
    if "lm_head.weight" not in files[-1]:
        raise NotApplicable("needs an lm_head (this layout shares the embedding table)")
    for t, f in enumerate(files[-cfg.tp_size :]):
        f["lm_head.weight"] = VOCAB.forward([embedding], cfg.tp_size, t)


@rank_edit
def bfloat16_detour(files: RankFiles, cfg: RuntimeConfig) -> None:
    """A float32 source loaded as bfloat16 (a `torch_dtype` default) before the cast to float16: every value
    keeps bfloat16's 8 significant bits instead of float16's 11."""
    for f in files:
        for name, tensor in f.items():
            f[name] = tensor.to(torch.bfloat16).to(tensor.dtype)


def _rewrite_op_tensors(checkpoint_dir: Path, source_dir: Path,
                        value: Callable[[tuple[SourceOp, ...], list[Tensor]], list[Tensor]]) -> None:
    """Rewrite every tensor made through an op that rounds as `value(ops, source cast to its stored dtype)`."""
    ckpt, source = TRTCheckpoint(checkpoint_dir), open_source(source_dir)
    tp = ckpt.mapping.tp_size
    planned = [(rank.rank, t) for rank in ckpt.plan.ranks for t in rank.tensors if not all(op.exact for op in t.ops)]
    if not planned:
        raise NotApplicable(f"{ckpt.card.name} has no op that rounds to get wrong")

    def edit(files: RankFiles, cfg: RuntimeConfig) -> None:
        for rank, t in planned:
            sources = value(t.ops, [source.load(s).to(t.torch_dtype) for s in t.sources])
            files[rank][t.name] = t.shard.forward(sources, tp, t.tp_rank)

    _rewrite_ranks(checkpoint_dir, edit)


def _apply(ops: tuple[SourceOp, ...], tensors: list[Tensor]) -> list[Tensor]:
    for op in ops:
        tensors = op.forward_all(tensors)
    return tensors


def op_skipped(checkpoint_dir: Path, source_dir: Path) -> None:
    """An op left out: the HF value stored where the format needs it transformed (a norm's 1 + weight)."""
    _rewrite_op_tensors(checkpoint_dir, source_dir, lambda ops, cast: cast)


def op_after_cast(checkpoint_dir: Path, source_dir: Path) -> None:
    """An op that rounds applied after the cast, in the checkpoint dtype, instead of in float32 and then cast."""
    _rewrite_op_tensors(checkpoint_dir, source_dir, _apply)


def transpose_skipped(checkpoint_dir: Path, source_dir: Path) -> None:
    """A transpose op left out (a Conv1D weight, stored [in, out], written as if it were a Linear's [out, in]):
    the square weights only, whose shape stays right, so only the values say it."""
    ckpt, source = TRTCheckpoint(checkpoint_dir), open_source(source_dir)
    tp = ckpt.mapping.tp_size
    planned = [(rank.rank, t) for rank in ckpt.plan.ranks for t in rank.tensors
               if t.ops and all(isinstance(op, Transpose) for op in t.ops) and t.source_shapes == t.stored_shapes]
    if not planned:
        raise NotApplicable(f"{ckpt.card.name} has no square weight stored transposed")

    def edit(files: RankFiles, cfg: RuntimeConfig) -> None:
        for rank, t in planned:
            sources = [source.load(s).to(t.torch_dtype) for s in t.sources]
            files[rank][t.name] = t.shard.forward(sources, tp, t.tp_rank)

    _rewrite_ranks(checkpoint_dir, edit)


def rotary_base_default(checkpoint_dir: Path, source_dir: Path) -> None:
    """config.json with rotary_base 10000 (the default) instead of the source's rope_theta."""
    path = checkpoint_dir / "config.json"
    config = json.loads(path.read_text())
    if config.get("rotary_base", 10000.0) == 10000.0:
        raise NotApplicable("needs a model whose rope_theta is not the default 10000")
    path.write_text(json.dumps({**config, "rotary_base": 10000.0}, indent=2) + "\n")


def fused_column_split_naively(checkpoint_dir: Path, source_dir: Path) -> None:
    """A fused column-parallel tensor (parts fused along dim 0, e.g. [up; gate]) split on dim 0 as one tensor:
    rank 0 gets the first part's rows only, instead of its share of every part."""
    ckpt, source = TRTCheckpoint(checkpoint_dir), open_source(source_dir)
    tp = ckpt.mapping.tp_size
    planned = [(rank.rank, t) for rank in ckpt.plan.ranks for t in rank.tensors if t.shard.kind == "fused-column"]
    if not planned or tp < 2:
        raise NotApplicable("needs a fused column-parallel tensor and tp_size >= 2")

    def edit(files: RankFiles, cfg: RuntimeConfig) -> None:
        for rank, t in planned:
            parts = to_stored(t.ops, [source.load(s) for s in t.sources], t.torch_dtype)
            files[rank][t.name] = torch.cat(parts).chunk(tp)[t.tp_rank]

    _rewrite_ranks(checkpoint_dir, edit)


def _rewrite_longrope(checkpoint_dir: Path, edit: Callable[[dict], dict]) -> None:
    """Rewrite config.json's longrope factors (TensorRT-LLM's long_rope fields, or a longrope rotary_scaling)."""
    path = checkpoint_dir / "config.json"
    config = json.loads(path.read_text())
    scaling = config.get("rotary_scaling") or {}
    if config.get("position_embedding_type") == "long_rope":
        config = edit(config)
    elif scaling.get("rope_type", scaling.get("type")) in ("longrope", "su"):
        short, long = scaling["short_factor"], scaling["long_factor"]
        fields = edit({"longrope_scaling_short_factors": short, "longrope_scaling_long_factors": long})
        if "longrope_scaling_short_factors" in fields:
            config["rotary_scaling"] = {**scaling, "short_factor": fields["longrope_scaling_short_factors"],
                                        "long_factor": fields["longrope_scaling_long_factors"]}
        else:
            config["rotary_scaling"] = None
    else:
        raise NotApplicable("needs a longrope model")
    path.write_text(json.dumps(config, indent=2) + "\n")


def longrope_factors_swapped(checkpoint_dir: Path, source_dir: Path) -> None:
    """config.json with the longrope short and long factors swapped."""
    _rewrite_longrope(checkpoint_dir, lambda c: {**c, "longrope_scaling_short_factors": c["longrope_scaling_long_factors"],
                                                 "longrope_scaling_long_factors": c["longrope_scaling_short_factors"]})


LONGROPE_FIELDS = ("longrope_scaling_short_factors", "longrope_scaling_long_factors", "longrope_short_mscale",
                   "longrope_long_mscale", "original_max_position_embeddings")


def longrope_factors_dropped(checkpoint_dir: Path, source_dir: Path) -> None:
    """config.json without the longrope factors: plain rope (as TensorRT-LLM 0.16's converter writes it below 128k positions)."""
    _rewrite_longrope(checkpoint_dir, lambda c: {**{k: v for k, v in c.items() if k not in LONGROPE_FIELDS},
                                                 "position_embedding_type": "rope_gpt_neox"})


OUTLIER = 7.0e4  # above float16's largest finite value, 65504


def source_outlier(model_dir: Path, source_dir: Path) -> None:
    """One source weight of layer 1 (the matrix the card maps to `mlp.proj.weight`, element [0, 0]) set to 7e4:
    casting it to float16 gives inf. (An inf in q instead can vanish in the runtime: torch's CPU float16
    attention kernel returns finite values for it.)"""
    card = get_card(open_source(model_dir).architecture)
    patterns = [re.escape(s.replace("{i}", "1")).replace(r"\{", "{").replace(r"\}", "}")
                for row in card.rows if row.stage == "layer" and row.target.endswith(".mlp.proj.weight")
                for s in row.sources]
    proj = re.compile("|".join(re.sub(r"\{\w+\}", r"\\d+", p) for p in patterns))  # other indices (experts): any
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names = sorted(n for n in f.keys() if proj.fullmatch(n))
        if names:
            tensors = load_file(path)
            tensors[names[0]][0, 0] = OUTLIER
            save_file(tensors, path, metadata={"format": "pt"})
            return
    raise NotApplicable(f"{model_dir}: no mlp.proj matrix in layer 1")


FP32_TP1_PP2 = Layout(pp_size=2)
BF16_TP2 = Layout(dtype="bfloat16", tp_size=2)
FP16_TP2_PP2 = Layout(dtype="float16", tp_size=2, pp_size=2)
FP32_TP4 = Layout(tp_size=4)

CATALOG: tuple[Mutant, ...] = (
    Mutant("gate-up-swapped", "gate_proj -> mlp.gate and up_proj -> mlp.fc on every rank",
           FP32_TP1_PP2, swap_gate_up, "layer 0"),
    Mutant("dense-not-transposed", "square attention.dense stored transposed (tp 1)",
           FP32_TP1_PP2, dense_not_transposed, "layer 0"),
    Mutant("qkv-order-kqv", "fused qkv concatenated as [k; q; v] on every rank",
           BF16_TP2, qkv_as_kqv, "layer 0"),
    Mutant("conv1d-not-transposed", "square [in, out] (Conv1D) weights stored without their transpose",
           BF16_TP2, transpose_skipped, "layer 0"),
    Mutant("dense-bias-divided", "row-parallel attention.dense.bias stored as bias / tp on every rank",
           BF16_TP2, dense_bias_divided_by_tp, "layer 0"),
    Mutant("rotary-base-default", "config.json rotary_base reset to 10000 (the self-test models use 500000)",
           BF16_TP2, rotary_base_default, "layer 0"),
    Mutant("q-heads-reversed", "each rank's q heads stored in reverse order",
           FP16_TP2_PP2, reverse_q_heads, "layer 0"),
    Mutant("stages-one-layer-early", "pipeline stages after the first start one layer early",
           FP16_TP2_PP2, stages_start_one_layer_early, "layer 2", at_stage_boundary=True),
    Mutant("lm-head-from-embedding", "untied model's lm_head written from the embedding",
           FP16_TP2_PP2, lm_head_from_embedding, "final norm + lm_head"),
    Mutant("bf16-detour", "float32 source loaded as bfloat16 before the cast to float16",
           FP16_TP2_PP2, bfloat16_detour, "embedding"),
    Mutant("fp16-overflow", "source weight of 7e4 cast to float16 -> inf, written without a range check",
           FP16_TP2_PP2, source_outlier, "layer 1", target="source"),
    Mutant("kv-from-next-head", "tp > kv heads: each rank's KV replica taken from the next KV head",
           FP32_TP4, kv_from_next_head, "layer 0"),
    Mutant("fc-split-on-dim1", "column-parallel mlp.fc split along dim 1",
           FP32_TP4, fc_split_on_dim1, "structure"),
    Mutant("experts-swapped", "two experts swapped in every stacked expert tensor",
           BF16_TP2, experts_swapped, "layer 0"),
    Mutant("lm-head-front-padding", "lm_head zero padding placed before the real rows",
           FP32_TP4, lm_head_padded_in_front, "final norm + lm_head"),
    Mutant("norm-not-shifted", "an op that rounds (a norm stored as 1 + weight) left out",
           BF16_TP2, op_skipped, "layer 0"),
    Mutant("fused-column-split-naively", "fused [up; gate] fc split on dim 0 as one tensor (rank 0: up rows only)",
           BF16_TP2, fused_column_split_naively, "layer 0"),
    Mutant("longrope-factors-swapped", "config.json longrope short and long factors swapped",
           BF16_TP2, longrope_factors_swapped, "layer 0"),
    Mutant("longrope-factors-dropped", "config.json longrope factors dropped (plain rope)",
           BF16_TP2, longrope_factors_dropped, "layer 0"),
    Mutant("norm-shift-after-cast", "an op that rounds (1 + weight) computed in bfloat16 after the cast, not in float32",
           BF16_TP2, op_after_cast, "layer 0"),
)


def _rewrite_target_ranks(checkpoint_dir: Path, edit: Callable[[RankFiles, int], None]) -> None:
    """`_rewrite_ranks` for rank files described by rank{N}.json: `edit(files, tp_size)`."""
    from shardproof.converter.rank_metadata import read_rank_metadata

    metadata = read_rank_metadata(checkpoint_dir, "trtllm-pytorch")
    paths = [checkpoint_dir / f"rank{m.rank}.safetensors" for m in metadata]
    files = [load_file(p) for p in paths]
    before = [dict(f) for f in files]
    edit(files, metadata[0].tp_size)
    if all(all(torch.equal(f[k], b[k]) for k in f) for f, b in zip(files, before)):
        raise NotApplicable("found nothing of its kind to change in this checkpoint")
    for path, tensors in zip(paths, files):
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def kv_bias_repeat_interleaved(checkpoint_dir: Path, source_dir: Path) -> None:
    """TensorRT-LLM's `HfWeightMapper._duplicate_kv` at tp > KV heads: a 1-D k/v bias duplicated element by element
    (`repeat_interleave`, [b0, b0, b1, b1, ...]) instead of head by head, then split per rank."""
    source = open_source(source_dir)
    hf = source.hf_config
    heads, kv = hf.num_attention_heads, hf.num_key_value_heads or hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads

    def edit(files: RankFiles, tp: int) -> None:
        if tp <= kv:
            raise NotApplicable(f"needs tp_size > num_key_value_heads={kv}")
        for rank, f in enumerate(files):
            for name in [n for n in f if n.endswith("self_attn.qkv_proj.bias")]:
                prefix = name[: -len("qkv_proj.bias")]
                q_rows = heads // tp * head_dim
                parts = [f[name][:q_rows]]
                for kind in ("k", "v"):
                    wrong = source.load(f"{prefix}{kind}_proj.bias").repeat_interleave(tp // kv)
                    parts.append(wrong.chunk(tp)[rank % tp].to(f[name].dtype))
                f[name] = torch.cat(parts)

    _rewrite_target_ranks(checkpoint_dir, edit)


def gate_up_as_up_gate(checkpoint_dir: Path, source_dir: Path) -> None:
    """Each rank's fused gate_up_proj written [up_r; gate_r] (the legacy `mlp.fc` order) instead of HF's
    [gate_r; up_r], weight and bias alike."""

    def edit(files: RankFiles, tp: int) -> None:
        for f in files:
            for name in [n for n in f if ".mlp.gate_up_proj." in n]:
                gate, up = f[name].chunk(2)
                f[name] = torch.cat([up, gate])

    _rewrite_target_ranks(checkpoint_dir, edit)


def catalog_for(target: str) -> tuple[Mutant, ...]:
    """Every mutant (both catalogs) that applies to conversions laid out in `target`."""
    return tuple(m for m in (*CATALOG, *PYTORCH_CATALOG) if m.applies_to(target))


PYTORCH_CATALOG: tuple[Mutant, ...] = (
    Mutant("kv-bias-repeat-interleaved", "tp > kv heads: k/v biases duplicated with repeat_interleave, not by heads "
           "(HfWeightMapper._duplicate_kv)", FP32_TP4, kv_bias_repeat_interleaved, "layer 0",
           rank_target="trtllm-pytorch"),
    Mutant("gate-up-as-up-gate", "fused gate_up_proj written [up_r; gate_r] on every rank",
           FP32_TP4, gate_up_as_up_gate, "layer 0", rank_target="trtllm-pytorch"),
)
