"""Reference forward pass over a TensorRT-LLM checkpoint directory, in pure torch.

Reads only ``config.json`` and ``rank{N}.safetensors`` and follows TensorRT-LLM's runtime
semantics: column-parallel ``qkv``/``fc``/``gate``/``lm_head``, row-parallel ``dense``/``proj``
whose partial sums are all-reduced over the TP group before the replicated bias is added once,
vocab-parallel logits all-gathered over TP, and hidden states handed from stage to stage.

The math is written once, per TP rank: every function takes the per-rank hidden states ``xs``
and per-rank weights ``ws`` (parallel lists) and a ``Collectives`` object that does the
cross-rank step. ``SimulatedCollectives`` holds every rank of a stage in this process and sums
in rank order; ``shardproof.verify.distributed_runtime`` runs one rank per process with torch.distributed.
Each rank keeps its own copy of the residual stream and uses its own copy of replicated
tensors, as the engine does, so a replica that differs between rank files shows up.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from shardproof.converter.safetensors_header import read_safetensors_header

# architecture -> whether attention.dense carries a bias when attn_bias is set
# (TensorRT-LLM: Llama's Attention defaults dense_bias to bias; Qwen2 has a q/k/v bias and no o_proj
# bias. HF's Qwen3 gives o_proj a bias exactly when attention_bias is set, so its dense bias follows attn_bias).
ARCHITECTURES = {
    "LlamaForCausalLM": True,
    "MistralForCausalLM": True,
    "Qwen2ForCausalLM": False,
    "Qwen3ForCausalLM": True,
    "GemmaForCausalLM": True,
}
# Gemma's runtime multiplies the embedding by sqrt(hidden_size); its checkpoint stores it unscaled.
SCALED_EMBEDDING = {"GemmaForCausalLM"}
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ROTARY_SCALING_TYPES = ("default", "linear", "llama3")


# --------------------------------------------------------------------------------------------
# Config and rank files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeConfig:
    """The fields of ``config.json`` that the runtime uses, checked."""

    architecture: str
    dtype: torch.dtype
    hidden_act: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    intermediate_size: int
    norm_epsilon: float
    rotary_base: float
    rotary_scaling: dict[str, Any] | None
    attn_bias: bool
    dense_bias: bool
    mlp_bias: bool
    qk_layernorm: bool
    use_parallel_embedding: bool
    embedding_sharding_dim: int
    tp_size: int
    pp_size: int

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def q_heads_per_rank(self) -> int:
        return self.num_heads // self.tp_size

    @property
    def kv_heads_per_rank(self) -> int:
        return max(self.num_kv_heads // self.tp_size, 1)

    @property
    def vocab_per_rank(self) -> int:
        """Rows of a vocab-parallel shard: ceil(V / tp) (the last shard is zero-padded)."""
        return math.ceil(self.vocab_size / self.tp_size)

    def stage_layers(self, pp_rank: int) -> list[int]:
        """Global indices of the layers held by stage ``pp_rank`` (first stages take extras)."""
        return torch.tensor_split(torch.arange(self.num_layers), self.pp_size)[pp_rank].tolist()


def load_config(path: Path) -> RuntimeConfig:
    """Parse and check ``config.json``; raise ``ValueError("<path>: <problem>")``."""

    def bad(problem: str) -> ValueError:
        return ValueError(f"{path}: {problem}")

    if not path.is_file():
        raise bad("missing config.json")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise bad("top level is not a JSON object")

    def need(key: str, where: dict = raw) -> Any:
        if key not in where:
            raise bad(f"missing key '{key}'")
        return where[key]

    arch, dtype = need("architecture"), need("dtype")
    if arch not in ARCHITECTURES:
        raise bad(f"unsupported architecture {arch!r} (supported: {sorted(ARCHITECTURES)})")
    if dtype not in DTYPES:
        raise bad(f"unsupported dtype {dtype!r} (supported: {sorted(DTYPES)})")
    if raw.get("hidden_act") not in ACTIVATIONS:
        raise bad(f"unsupported hidden_act {raw.get('hidden_act')!r} (supported: {sorted(ACTIVATIONS)})")
    if raw.get("position_embedding_type") != "rope_gpt_neox":
        raise bad(f"unsupported position_embedding_type {raw.get('position_embedding_type')!r}")
    quant = raw.get("quantization") or {}
    if quant.get("quant_algo") or quant.get("kv_cache_quant_algo"):
        raise bad(f"quantized checkpoints are not supported ({quant})")
    if (raw.get("moe") or {}).get("num_experts", 0):
        raise bad("MoE checkpoints are not supported")
    mapping = need("mapping")
    if not isinstance(mapping, dict):
        raise bad("'mapping' is not an object")
    if mapping.get("cp_size", 1) != 1:
        raise bad("context parallelism (mapping.cp_size > 1) is not supported")

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    scaling = raw.get("rotary_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
        if kind not in ROTARY_SCALING_TYPES:
            raise bad(f"unsupported rotary_scaling {scaling!r} (types: {ROTARY_SCALING_TYPES})")
        scaling = None if kind == "default" else {**scaling, "rope_type": kind}
    cfg = RuntimeConfig(
        architecture=arch,
        dtype=DTYPES[dtype],
        hidden_act=raw["hidden_act"],
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_size=int(raw.get("head_size") or hidden // heads),
        intermediate_size=int(need("intermediate_size")),
        norm_epsilon=float(need("norm_epsilon")),
        rotary_base=float(raw.get("rotary_base", 10000.0)),
        rotary_scaling=scaling,
        attn_bias=bool(raw.get("attn_bias", False)),
        dense_bias=bool(raw.get("attn_bias", False)) and ARCHITECTURES[arch],
        mlp_bias=bool(raw.get("mlp_bias", False)),
        qk_layernorm=bool(raw.get("qk_layernorm", False)),
        use_parallel_embedding=bool(raw.get("use_parallel_embedding", False)),
        embedding_sharding_dim=int(raw.get("embedding_sharding_dim", 0)),
        tp_size=int(need("tp_size", mapping)),
        pp_size=int(need("pp_size", mapping)),
    )
    tp, pp = cfg.tp_size, cfg.pp_size
    checks = [
        (tp >= 1 and pp >= 1, f"tp_size={tp}, pp_size={pp} must be >= 1"),
        (int(mapping.get("world_size", tp * pp)) == tp * pp,
         f"mapping.world_size={mapping.get('world_size')} != tp_size*pp_size={tp * pp}"),
        (cfg.num_layers >= pp, f"num_hidden_layers={cfg.num_layers} < pp_size={pp}"),
        (cfg.num_heads % tp == 0, f"num_attention_heads={cfg.num_heads} not divisible by tp={tp}"),
        (cfg.num_kv_heads % tp == 0 or tp % cfg.num_kv_heads == 0,
         f"num_key_value_heads={cfg.num_kv_heads} and tp={tp}: neither divides the other"),
        (cfg.num_heads % cfg.num_kv_heads == 0,
         f"num_attention_heads={cfg.num_heads} not a multiple of num_key_value_heads"),
        (cfg.intermediate_size % tp == 0, f"intermediate_size not divisible by tp={tp}"),
        (cfg.embedding_sharding_dim in (0, 1), "embedding_sharding_dim must be 0 or 1"),
        (not (cfg.use_parallel_embedding and cfg.embedding_sharding_dim == 1)
         or hidden % tp == 0, f"hidden_size not divisible by tp={tp} (embedding_sharding_dim=1)"),
    ]
    for ok, problem in checks:
        if not ok:
            raise bad(problem)
    return cfg


def expected_tensors(cfg: RuntimeConfig, rank: int) -> dict[str, tuple[int, ...]]:
    """Every tensor name of ``rank{rank}.safetensors`` with its shape, from the config alone."""
    pp_rank, H, hd = rank // cfg.tp_size, cfg.hidden_size, cfg.head_size
    nq, nkv, ffn = cfg.q_heads_per_rank, cfg.kv_heads_per_rank, cfg.intermediate_size // cfg.tp_size
    out: dict[str, tuple[int, ...]] = {}
    if pp_rank == 0:
        out["transformer.vocab_embedding.weight"] = (
            (cfg.vocab_size, H) if not cfg.use_parallel_embedding
            else (cfg.vocab_per_rank, H) if cfg.embedding_sharding_dim == 0
            else (cfg.vocab_size, H // cfg.tp_size))
    for j in range(len(cfg.stage_layers(pp_rank))):
        p = f"transformer.layers.{j}."
        qkv_rows = (nq + 2 * nkv) * hd
        out |= {p + "input_layernorm.weight": (H,), p + "attention.qkv.weight": (qkv_rows, H),
                p + "attention.dense.weight": (H, nq * hd), p + "post_layernorm.weight": (H,),
                p + "mlp.fc.weight": (ffn, H), p + "mlp.gate.weight": (ffn, H),
                p + "mlp.proj.weight": (H, ffn)}
        if cfg.attn_bias:
            out[p + "attention.qkv.bias"] = (qkv_rows,)
        if cfg.dense_bias:
            out[p + "attention.dense.bias"] = (H,)
        if cfg.qk_layernorm:
            out |= {p + "attention.q_layernorm.weight": (hd,), p + "attention.k_layernorm.weight": (hd,)}
        if cfg.mlp_bias:
            out |= {p + "mlp.fc.bias": (ffn,), p + "mlp.gate.bias": (ffn,), p + "mlp.proj.bias": (H,)}
    if pp_rank == cfg.pp_size - 1:
        out["transformer.ln_f.weight"] = (H,)
        out["lm_head.weight"] = (cfg.vocab_per_rank, H)
    return out


class RankWeights:
    """Read-only view of one rank file: ``w[name]`` checks name, shape and dtype, then casts."""

    def __init__(self, path: Path, tensors: dict[str, Tensor], expected: dict[str, tuple[int, ...]],
                 stored_dtype: torch.dtype, tp_rank: int, device: torch.device | str,
                 dtype: torch.dtype, prefix: str = "") -> None:
        self.path, self.tp_rank, self.prefix = path, tp_rank, prefix
        self._tensors, self._expected, self._stored_dtype = tensors, expected, stored_dtype
        self._device, self._dtype = device, dtype

    def __getitem__(self, name: str) -> Tensor:
        full = self.prefix + name
        if full not in self._tensors:
            raise ValueError(f"{self.path}: missing tensor '{full}'")
        t = self._tensors[full]
        if full in self._expected and tuple(t.shape) != self._expected[full]:
            raise ValueError(f"{self.path}: tensor '{full}' has shape {list(t.shape)}, "
                             f"expected {list(self._expected[full])}")
        if t.dtype != self._stored_dtype:
            raise ValueError(f"{self.path}: tensor '{full}' is {t.dtype}, config says {self._stored_dtype}")
        return t.to(device=self._device, dtype=self._dtype)

    def scope(self, prefix: str) -> RankWeights:
        """The same file with ``prefix`` prepended to every name."""
        return RankWeights(self.path, self._tensors, self._expected, self._stored_dtype,
                           self.tp_rank, self._device, self._dtype, self.prefix + prefix)


class ShardedCheckpoint:
    """A TensorRT-LLM checkpoint directory: parsed config plus lazily loaded rank files."""

    def __init__(self, checkpoint_dir: str | Path) -> None:
        self.path = Path(checkpoint_dir)
        if not self.path.is_dir():
            raise ValueError(f"{self.path}: checkpoint directory does not exist")
        self.config = load_config(self.path / "config.json")
        self._files: dict[int, dict[str, Tensor]] = {}

    def rank_path(self, rank: int) -> Path:
        return self.path / f"rank{rank}.safetensors"

    def tensors(self, rank: int) -> dict[str, Tensor]:
        """Raw tensors of ``rank{rank}.safetensors`` (loaded on first use, then cached)."""
        if not 0 <= rank < self.config.world_size:
            raise ValueError(f"{self.path}: rank {rank} outside world_size {self.config.world_size}")
        if rank not in self._files:
            path = self.rank_path(rank)
            if not path.is_file():
                raise ValueError(f"{path}: missing rank file")
            try:
                read_safetensors_header(path)  # judged first exactly as convert and reassemble judge it
                self._files[rank] = load_file(path)
            except Exception as e:  # ShardproofError, or safetensors' own error types for corrupt files
                raise ValueError(f"{path}: unreadable safetensors file ({e})") from None
        return self._files[rank]

    def weights(self, rank: int, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None) -> RankWeights:
        """Checked view of one rank's tensors, cast to ``dtype`` (default: checkpoint dtype)."""
        cfg = self.config
        return RankWeights(self.rank_path(rank), self.tensors(rank), expected_tensors(cfg, rank),
                           cfg.dtype, rank % cfg.tp_size, device, dtype or cfg.dtype)

    def validate(self, ranks: Sequence[int] | None = None) -> None:
        """Fail on any missing, unexpected, misshapen or wrongly typed tensor in the rank files."""
        cfg = self.config
        for rank in range(cfg.world_size) if ranks is None else ranks:
            path, found, expected = self.rank_path(rank), self.tensors(rank), expected_tensors(cfg, rank)
            if missing := sorted(set(expected) - set(found)):
                raise ValueError(f"{path}: missing tensor(s) {missing}")
            if extra := sorted(set(found) - set(expected)):
                raise ValueError(f"{path}: unexpected tensor(s) {extra}")
            for name, shape in expected.items():
                if tuple(found[name].shape) != shape:
                    raise ValueError(f"{path}: tensor '{name}' has shape {list(found[name].shape)}, "
                                     f"expected {list(shape)}")
                if found[name].dtype != cfg.dtype:
                    raise ValueError(f"{path}: tensor '{name}' is {found[name].dtype}, "
                                     f"config says {cfg.dtype}")


# --------------------------------------------------------------------------------------------
# Collectives
# --------------------------------------------------------------------------------------------


class Collectives(Protocol):
    """Cross-rank steps of one TP group; lists hold one tensor per TP rank run in this process."""

    def all_reduce(self, parts: list[Tensor]) -> list[Tensor]: ...

    def all_gather(self, parts: list[Tensor], dim: int) -> list[Tensor]: ...


class SimulatedCollectives:
    """Every TP rank of a stage in this process; sums in ascending rank order."""

    def all_reduce(self, parts: list[Tensor]) -> list[Tensor]:
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return [total] * len(parts)

    def all_gather(self, parts: list[Tensor], dim: int) -> list[Tensor]:
        return [torch.cat(parts, dim)] * len(parts)


# --------------------------------------------------------------------------------------------
# The model (one TP rank at a time; the collectives join them)
# --------------------------------------------------------------------------------------------


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm with the statistics in float32, scaled by ``weight`` in the compute dtype."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotary_cos_sin(cfg: RuntimeConfig, seq_len: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """float32 cos/sin tables [T, head_size] for rope_gpt_neox with the configured scaling."""
    hd, s = cfg.head_size, cfg.rotary_scaling
    inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    pos = torch.arange(seq_len, dtype=torch.float32)
    if s is not None and s["rope_type"] == "linear":
        pos = pos / float(s["factor"])
    elif s is not None and s["rope_type"] == "llama3":  # as transformers' _compute_llama3_parameters
        factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_ctx = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / hi) & ~(wavelen > old_ctx / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1).to(device)
    return emb.cos(), emb.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """GPT-NeoX ("rotate half") rotary embedding of x [B, heads, T, head_size]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


def attention_partial(x: Tensor, w: RankWeights, cfg: RuntimeConfig, rope: tuple[Tensor, Tensor]) -> Tensor:
    """One rank's share of norm -> attention -> dense: a partial sum, before the all-reduce."""
    B, T, _ = x.shape
    nq, nkv, hd = cfg.q_heads_per_rank, cfg.kv_heads_per_rank, cfg.head_size
    h = rms_norm(x, w["input_layernorm.weight"], cfg.norm_epsilon)
    qkv = F.linear(h, w["attention.qkv.weight"], w["attention.qkv.bias"] if cfg.attn_bias else None)
    q, k, v = (t.reshape(B, T, -1, hd) for t in qkv.split([nq * hd, nkv * hd, nkv * hd], dim=-1))
    if cfg.qk_layernorm:  # Qwen3: per-head RMSNorm over head_size, before rotary
        q = rms_norm(q, w["attention.q_layernorm.weight"], cfg.norm_epsilon)
        k = rms_norm(k, w["attention.k_layernorm.weight"], cfg.norm_epsilon)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    k, v = k.repeat_interleave(nq // nkv, dim=1), v.repeat_interleave(nq // nkv, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.linear(o.transpose(1, 2).reshape(B, T, nq * hd), w["attention.dense.weight"])


def mlp_partial(x: Tensor, w: RankWeights, cfg: RuntimeConfig) -> Tensor:
    """One rank's share of norm -> proj(act(fc(x)) * gate(x)), before the all-reduce."""
    h = rms_norm(x, w["post_layernorm.weight"], cfg.norm_epsilon)
    fc = F.linear(h, w["mlp.fc.weight"], w["mlp.fc.bias"] if cfg.mlp_bias else None)
    gate = F.linear(h, w["mlp.gate.weight"], w["mlp.gate.bias"] if cfg.mlp_bias else None)
    return F.linear(ACTIVATIONS[cfg.hidden_act](fc) * gate, w["mlp.proj.weight"])


def decoder_layer(xs: list[Tensor], ws: list[RankWeights], cfg: RuntimeConfig,
                  rope: tuple[Tensor, Tensor], comm: Collectives) -> list[Tensor]:
    """x + dense(attn(norm(x))), then x + proj(mlp(norm(x))); row-parallel biases added once."""
    attn = comm.all_reduce([attention_partial(x, w, cfg, rope) for x, w in zip(xs, ws)])
    if cfg.dense_bias:
        attn = [a + w["attention.dense.bias"] for a, w in zip(attn, ws)]
    xs = [x + a for x, a in zip(xs, attn)]
    mlp = comm.all_reduce([mlp_partial(x, w, cfg) for x, w in zip(xs, ws)])
    if cfg.mlp_bias:
        mlp = [m + w["mlp.proj.bias"] for m, w in zip(mlp, ws)]
    return [x + m for x, m in zip(xs, mlp)]


def embed(ids: Tensor, ws: list[RankWeights], cfg: RuntimeConfig, comm: Collectives) -> list[Tensor]:
    """Token embedding: replicated, vocab-parallel (masked lookup + all-reduce) or hidden-parallel."""
    xs = _lookup(ids, ws, cfg, comm)
    if cfg.architecture in SCALED_EMBEDDING:
        xs = [x * torch.tensor(cfg.hidden_size**0.5, dtype=x.dtype) for x in xs]
    return xs


def _lookup(ids: Tensor, ws: list[RankWeights], cfg: RuntimeConfig, comm: Collectives) -> list[Tensor]:
    tables = [w["transformer.vocab_embedding.weight"] for w in ws]
    if not cfg.use_parallel_embedding:
        return [F.embedding(ids, t) for t in tables]
    if cfg.embedding_sharding_dim == 1:
        return comm.all_gather([F.embedding(ids, t) for t in tables], dim=-1)
    parts = []
    for w, t in zip(ws, tables):
        local = ids - w.tp_rank * t.shape[0]
        inside = (local >= 0) & (local < t.shape[0])
        rows = F.embedding(local.clamp(0, t.shape[0] - 1), t)
        parts.append(torch.where(inside.unsqueeze(-1), rows, torch.zeros((), dtype=t.dtype, device=t.device)))
    return comm.all_reduce(parts)


def lm_logits(xs: list[Tensor], ws: list[RankWeights], cfg: RuntimeConfig, comm: Collectives) -> list[Tensor]:
    """ln_f then the vocab-parallel lm_head, gathered over TP and cut to vocab_size, float32."""
    local = [F.linear(rms_norm(x, w["transformer.ln_f.weight"], cfg.norm_epsilon), w["lm_head.weight"])
             for x, w in zip(xs, ws)]
    return [full[..., : cfg.vocab_size].float() for full in comm.all_gather(local, dim=-1)]


def run_stage(cfg: RuntimeConfig, pp_rank: int, ws: list[RankWeights], inputs: Tensor | list[Tensor],
              comm: Collectives, rope: tuple[Tensor, Tensor],
              hidden: list[Tensor] | None = None) -> list[Tensor]:
    """One pipeline stage for the TP ranks ``ws``: token ids (first stage) or per-rank hidden
    states in; per-rank hidden states (or float32 logits on the last stage) out. Appends a
    float32 copy of TP rank ws[0]'s residual stream after each layer to ``hidden`` if given."""
    xs = embed(inputs, ws, cfg, comm) if pp_rank == 0 else list(inputs)
    for j in range(len(cfg.stage_layers(pp_rank))):
        xs = decoder_layer(xs, [w.scope(f"transformer.layers.{j}.") for w in ws], cfg, rope, comm)
        if hidden is not None:
            hidden.append(xs[0].float())
    return lm_logits(xs, ws, cfg, comm) if pp_rank == cfg.pp_size - 1 else xs


def check_input_ids(input_ids: Tensor, cfg: RuntimeConfig) -> Tensor:
    """Reject anything but a non-empty [B, T] integer tensor of ids in [0, vocab_size)."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError("input_ids must be an integer tensor of shape [batch, seq_len]")
    if input_ids.numel() == 0:
        raise ValueError("input_ids is empty")
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size:
        raise ValueError(f"input_ids outside [0, {cfg.vocab_size})")
    return input_ids.long()


def run_simulated(checkpoint_dir: str | Path | ShardedCheckpoint, input_ids: Tensor,
                  device: torch.device | str = "cpu", compute_dtype: torch.dtype | None = None,
                  return_hidden: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Run every rank of the checkpoint in this process; return float32 logits [B, T, vocab_size].

    ``compute_dtype`` defaults to the checkpoint dtype. With ``return_hidden`` also return the
    residual stream [B, T, H] (float32) after each of the ``num_hidden_layers`` global layers
    (before ln_f), as seen by TP rank 0 of the stage holding the layer.
    """
    ckpt = (checkpoint_dir if isinstance(checkpoint_dir, ShardedCheckpoint)
            else ShardedCheckpoint(checkpoint_dir))
    cfg = ckpt.config
    ckpt.validate()
    ids = check_input_ids(input_ids, cfg).to(device)
    rope = rotary_cos_sin(cfg, ids.shape[1], device)
    comm, hidden = SimulatedCollectives(), ([] if return_hidden else None)
    xs: Tensor | list[Tensor] = ids
    for pp_rank in range(cfg.pp_size):  # TP rank t of stage p hands its hidden states to TP rank t of p+1
        ws = [ckpt.weights(pp_rank * cfg.tp_size + t, device, compute_dtype) for t in range(cfg.tp_size)]
        xs = run_stage(cfg, pp_rank, ws, xs, comm, rope, hidden)
    return (xs[0], hidden) if return_hidden else xs[0]
