"""The sharded reference runtime against HF transformers: tiny random models, converted, run.

The runtime reads only the TensorRT-LLM checkpoint (config.json + rank files), so agreement with
HF's own forward pass checks the converter's layout end to end; the tampered-checkpoint tests
show that a wrong layout is not silently undone by the runtime.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import shardproof.converter.card as card_module
from shardproof.converter.api import convert
from shardproof.converter.card import get_card
from shardproof.converter.errors import CheckNotRun
from shardproof.verify.forward import BatchOptions
from shardproof.verify.runtime.distributed import run_distributed
from shardproof.verify.runtime.rank_files import ShardedCheckpoint
from shardproof.verify.runtime.simulated import run_simulated
from shardproof.verify.sharded_check import HFReference, check_sharded
from shardproof.verify.tiny_models import build_tiny_model
from shardproof.converter.registry import Entry

SEQ_LEN = 64
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
# Every scaling switches branch below SEQ_LEN: dynamic NTK rescales past max_position_embeddings (32), yarn
# extends original_max_position_embeddings (16), so the long-context tables really run. longrope runs as TensorRT-LLM's
# long_rope (tests/test_rotary.py, tests/test_phi3.py); as a rope_gpt_neox rotary_scaling it is not run.
DYNAMIC_ROPE = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}

# id: (architecture, HF config overrides, convert kwargs)
CASES = {
    "llama-base-tp1-pp1": ("LlamaForCausalLM", {}, dict(tp_size=1, pp_size=1)),
    "llama-gqa-kv2-tp4": ("LlamaForCausalLM", {"num_key_value_heads": 2}, dict(tp_size=4)),
    "llama-mqa-kv1-tp4-pp3-emb-dim1": (
        "LlamaForCausalLM", {"num_key_value_heads": 1},
        dict(tp_size=4, pp_size=3, use_parallel_embedding=True, embedding_sharding_dim=1)),
    "llama-tied-v97-tp2-pp2-emb-dim0": (
        "LlamaForCausalLM", {"tie_word_embeddings": True},
        dict(tp_size=2, pp_size=2, use_parallel_embedding=True, embedding_sharding_dim=0)),
    "llama-uneven-pp2": ("LlamaForCausalLM", {}, dict(tp_size=1, pp_size=2)),
    "llama-attn-mlp-bias-tp2-pp2": (
        "LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}, dict(tp_size=2, pp_size=2)),
    "llama-rope-llama3-tp2": ("LlamaForCausalLM", {"rope_parameters": LLAMA3_ROPE}, dict(tp_size=2)),
    "llama-rope-linear-tp2": ("LlamaForCausalLM", {"rope_parameters": LINEAR_ROPE}, dict(tp_size=2)),
    "llama-rope-dynamic-tp2": (
        "LlamaForCausalLM", {"rope_parameters": DYNAMIC_ROPE, "max_position_embeddings": 32}, dict(tp_size=2)),
    "llama-rope-yarn-tp2": ("LlamaForCausalLM", {"rope_parameters": YARN_ROPE, "max_position_embeddings": 64},
                            dict(tp_size=2)),
    "qwen2-qkv-bias-kv2-tp4": ("Qwen2ForCausalLM", {"num_key_value_heads": 2}, dict(tp_size=4)),
    "qwen2-tied-tp2-pp3-emb-dim0": (
        "Qwen2ForCausalLM", {"tie_word_embeddings": True},
        dict(tp_size=2, pp_size=3, use_parallel_embedding=True)),
    "qwen3-qknorm-hd32-tp2-pp2": ("Qwen3ForCausalLM", {"head_dim": 32}, dict(tp_size=2, pp_size=2)),
    "qwen3-qknorm-hd32-kv2-tp4-tied": (
        "Qwen3ForCausalLM", {"head_dim": 32, "num_key_value_heads": 2, "tie_word_embeddings": True},
        dict(tp_size=4)),
    "gemma-norm-plus-one-mqa-tp2-pp2-tied": (
        "GemmaForCausalLM", {"num_key_value_heads": 1, "tie_word_embeddings": True}, dict(tp_size=2, pp_size=2)),
    "mistral-v128-tp4-emb-dim0": (
        "MistralForCausalLM", {"vocab_size": 128},
        dict(tp_size=4, use_parallel_embedding=True, embedding_sharding_dim=0)),
}


def _input_ids(vocab_size: int, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(seed))
    ids[0, :2] = torch.tensor([0, vocab_size - 1])  # first and last row of the (padded) vocab
    return ids


def _hf_reference(model_dir: Path, ids: torch.Tensor, dtype: torch.dtype = torch.float32):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return model, out.logits.float(), [h.float() for h in out.hidden_states]


def _convert_case(tmp_path: Path, case: str, dtype: str = "float32") -> tuple[Path, Path]:
    arch, overrides, layout = CASES[case]
    hf_dir = build_tiny_model(tmp_path / "hf", arch, seed=sum(map(ord, case)), **overrides)
    ckpt_dir = tmp_path / "trtllm"
    convert(hf_dir, ckpt_dir, dtype=dtype, **layout)
    return hf_dir, ckpt_dir


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _rewrite_ranks(ckpt_dir: Path, edit) -> None:
    """Apply `edit(tensors) -> tensors` to every rank file of a checkpoint, in place."""
    for path in sorted(ckpt_dir.glob("rank*.safetensors")):
        save_file(edit(load_file(path)), path)


@pytest.fixture(scope="module")
def llama_tp2(tmp_path_factory) -> tuple[Path, Path]:
    """A Llama (GQA, untied, vocab 97) converted at tp=2, pp=1, with a vocab-parallel embedding."""
    tmp = tmp_path_factory.mktemp("llama_tp2")
    hf_dir = build_tiny_model(tmp / "hf", "LlamaForCausalLM", seed=7)
    convert(hf_dir, tmp / "trtllm", dtype="float32", tp_size=2, use_parallel_embedding=True)
    return hf_dir, tmp / "trtllm"


# ------------------------------------------------------------------------------------------
# 1. float32 logits (and per-layer hidden states) match HF's float32 forward
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_simulated_matches_hf_float32(tmp_path: Path, case: str) -> None:
    hf_dir, ckpt_dir = _convert_case(tmp_path, case)
    cfg = ShardedCheckpoint(ckpt_dir).config
    ids = _input_ids(cfg.vocab_size)
    model, ref_logits, ref_hidden = _hf_reference(hf_dir, ids)

    logits, hidden = run_simulated(ckpt_dir, ids, return_hidden=True)

    assert logits.dtype == torch.float32 and logits.shape == (2, SEQ_LEN, cfg.vocab_size)
    diff = (logits - ref_logits).abs().max()
    assert _rel_err(logits, ref_logits) < 1e-5, f"{case}: max abs diff {diff:.3e}"
    # hidden[i] is the residual stream after layer i; HF's hidden_states[i + 1] the same, except
    # its last entry, which is after the final norm.
    assert len(hidden) == cfg.num_layers
    for i, h in enumerate(hidden[:-1]):
        assert _rel_err(h, ref_hidden[i + 1]) < 1e-5, f"{case}: layer {i}"
    with torch.no_grad():
        final = model.model.norm(hidden[-1])  # HF's own final norm (Gemma's multiplies by 1 + weight)
    assert _rel_err(final, ref_hidden[-1]) < 1e-5


def test_rope_scaling_is_applied(tmp_path: Path) -> None:
    """The llama3 case would pass with scaling ignored only if scaling changed nothing: it does."""
    hf_dir, ckpt_dir = _convert_case(tmp_path, "llama-rope-llama3-tp2")
    config_path = ckpt_dir / "config.json"
    ids = _input_ids(97)
    scaled = run_simulated(ckpt_dir, ids)
    raw = json.loads(config_path.read_text())
    assert raw["rotary_scaling"]["rope_type"] == "llama3"
    config_path.write_text(json.dumps({**raw, "rotary_scaling": None}))
    unscaled = run_simulated(ckpt_dir, ids)
    assert _rel_err(unscaled, scaled) > 1e-3


def test_bfloat16_checkpoint(tmp_path: Path) -> None:
    """A bf16 checkpoint computes in bf16 by default; compute_dtype=float32 matches HF in float32."""
    hf_dir, ckpt_dir = _convert_case(tmp_path, "qwen3-qknorm-hd32-tp2-pp2", dtype="bfloat16")
    ids = _input_ids(97)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():  # the checkpoint's values, widened back to float32
            p.copy_(p.to(torch.bfloat16).float())
        ref32 = model(ids).logits
        ref16 = model.to(torch.bfloat16)(ids).logits.float()

    assert _rel_err(run_simulated(ckpt_dir, ids, compute_dtype=torch.float32), ref32) < 1e-5
    native = run_simulated(ckpt_dir, ids)
    assert native.dtype == torch.float32
    assert _rel_err(native, ref16) < 0.05  # both in bf16, different kernels and summation orders
    assert not torch.equal(native, ref32)


# ------------------------------------------------------------------------------------------
# 2. the distributed (torchrun, gloo) path equals the simulated path
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [dict(tp_size=2, pp_size=1), dict(tp_size=1, pp_size=2)],
                         ids=["tp2-pp1", "tp1-pp2"])
def test_distributed_gloo_equals_simulated(tmp_path: Path, layout: dict) -> None:
    """Bit-identical: with two ranks an all-reduce is one addition, a + b == b + a exactly; the
    all-gather and send/recv only move bytes; each rank runs the same kernels on the same shapes."""
    hf_dir = build_tiny_model(tmp_path / "hf", "LlamaForCausalLM", seed=3, num_key_value_heads=2)
    convert(hf_dir, tmp_path / "trtllm", dtype="float32", use_parallel_embedding=True, **layout)
    ids = _input_ids(97)

    distributed = run_distributed(tmp_path / "trtllm", ids, nproc=2, backend="gloo", timeout_s=240)
    simulated = run_simulated(tmp_path / "trtllm", ids)

    assert distributed.shape == simulated.shape == (2, SEQ_LEN, 97)
    assert torch.equal(distributed, simulated), f"max abs diff {(distributed - simulated).abs().max():.3e}"
    _, ref, _ = _hf_reference(hf_dir, ids)
    assert _rel_err(distributed, ref) < 1e-5


def test_distributed_reports_worker_failure(llama_tp2, tmp_path: Path) -> None:
    _, ckpt_dir = llama_tp2
    broken = shutil.copytree(ckpt_dir, tmp_path / "broken")
    (broken / "rank1.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RuntimeError, match=r"rank1: ValueError: \S*rank1\.safetensors: unreadable"):
        run_distributed(broken, _input_ids(97), timeout_s=240)
    with pytest.raises(ValueError, match="world_size is 2"):
        run_distributed(ckpt_dir, _input_ids(97), nproc=3)


# ------------------------------------------------------------------------------------------
# 3. tampered checkpoints give logits far from HF's
# ------------------------------------------------------------------------------------------


def _swap_fc_gate(t: dict) -> dict:
    return {k.replace("mlp.fc.", "mlp.@.").replace("mlp.gate.", "mlp.fc.").replace("mlp.@.", "mlp.gate."): v
            for k, v in t.items()}


def _swap_k_v(t: dict, q_rows: int, kv_rows: int) -> dict:
    def swap(v: torch.Tensor) -> torch.Tensor:
        q, k, vv = v.split([q_rows, kv_rows, kv_rows])
        return torch.cat([q, vv, k]).contiguous()
    return {k: swap(v) if k.endswith("attention.qkv.weight") else v for k, v in t.items()}


def _unit_norms(t: dict) -> dict:
    return {k: torch.ones_like(v) if "layernorm" in k or "ln_f" in k else v for k, v in t.items()}


@pytest.mark.parametrize("mutant", ["swap-fc-gate", "swap-k-v", "norms-at-init"])
def test_tampered_checkpoint_is_far_from_hf(llama_tp2, tmp_path: Path, mutant: str) -> None:
    hf_dir, ckpt_dir = llama_tp2
    ids = _input_ids(97)
    _, ref, _ = _hf_reference(hf_dir, ids)
    assert _rel_err(run_simulated(ckpt_dir, ids), ref) < 1e-5  # the untampered checkpoint agrees

    tampered = shutil.copytree(ckpt_dir, tmp_path / "tampered")
    cfg = ShardedCheckpoint(tampered).config
    edit = {"swap-fc-gate": _swap_fc_gate,
            "swap-k-v": lambda t: _swap_k_v(t, cfg.q_heads_per_rank * cfg.head_size,
                                             cfg.kv_heads_per_rank * cfg.head_size),
            "norms-at-init": _unit_norms}[mutant]
    _rewrite_ranks(tampered, edit)

    assert _rel_err(run_simulated(tampered, ids), ref) > 1e-2


# ------------------------------------------------------------------------------------------
# bad input fails with the path and the problem
# ------------------------------------------------------------------------------------------


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"config\.json: missing"):
        ShardedCheckpoint(tmp_path)


def test_missing_rank_file(llama_tp2, tmp_path: Path) -> None:
    ckpt = shutil.copytree(llama_tp2[1], tmp_path / "c")
    (ckpt / "rank1.safetensors").unlink()
    with pytest.raises(ValueError, match=r"rank1\.safetensors: missing rank file"):
        run_simulated(ckpt, _input_ids(97))


def test_missing_and_unexpected_tensor(llama_tp2, tmp_path: Path) -> None:
    ckpt = shutil.copytree(llama_tp2[1], tmp_path / "c")
    name = "transformer.layers.1.mlp.proj.weight"
    tensors = load_file(ckpt / "rank1.safetensors")
    save_file({k: v for k, v in tensors.items() if k != name}, ckpt / "rank1.safetensors")
    with pytest.raises(ValueError, match=rf"rank1\.safetensors: missing tensor.*{name}"):
        run_simulated(ckpt, _input_ids(97))
    extra = {"transformer.layers.1.attention.dense.bias": torch.zeros(64)}
    save_file({**tensors, **extra}, ckpt / "rank1.safetensors")
    with pytest.raises(ValueError, match=r"rank1\.safetensors: unexpected tensor.*dense\.bias"):
        run_simulated(ckpt, _input_ids(97))


def test_wrong_shape_and_dtype(llama_tp2, tmp_path: Path) -> None:
    ckpt = shutil.copytree(llama_tp2[1], tmp_path / "c")
    tensors = load_file(ckpt / "rank0.safetensors")
    lm = "lm_head.weight"
    save_file({**tensors, lm: tensors[lm][:-1].contiguous()}, ckpt / "rank0.safetensors")
    shape = r"rank0\.safetensors: tensor 'lm_head\.weight' has shape \[48, 64\], expected \[49, 64\]"
    with pytest.raises(ValueError, match=shape):
        run_simulated(ckpt, _input_ids(97))
    save_file({**tensors, lm: tensors[lm].half()}, ckpt / "rank0.safetensors")
    with pytest.raises(ValueError, match=r"rank0\.safetensors: tensor 'lm_head\.weight' is torch\.float16"):
        run_simulated(ckpt, _input_ids(97))


def _patched(ckpt_dir: Path, tmp_path: Path, patch: dict) -> Path:
    """A copy of the checkpoint whose config.json has `patch` merged in (one level deep)."""
    ckpt = shutil.copytree(ckpt_dir, tmp_path / "c")
    raw = json.loads((ckpt / "config.json").read_text())
    merged = {k: {**raw[k], **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
              for k, v in patch.items()}
    (ckpt / "config.json").write_text(json.dumps({**raw, **merged}))
    return ckpt


@pytest.mark.parametrize("patch, problem", [
    ({"architecture": "NoSuchForCausalLM"}, "architecture 'NoSuchForCausalLM' is not supported"),
    ({"num_attention_heads": 5}, "num_attention_heads=5 not divisible by tp=2"),
    ({"rotary_scaling": {"factor": 2.0}}, "rotary_scaling .* names no rope_type"),
    ({"rotary_scaling": "yarn"}, "rotary_scaling 'yarn' is not an object"),
    ({"mapping": {"world_size": 3}}, "mapping.world_size=3"),
], ids=["unknown-architecture", "heads", "untyped-rope", "rope-not-object", "world-size"])
def test_bad_config(llama_tp2, tmp_path: Path, patch: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=rf"config\.json: {problem}"):
        ShardedCheckpoint(_patched(llama_tp2[1], tmp_path, patch))


@pytest.mark.parametrize("patch, feature", [
    ({"rotary_scaling": {"rope_type": "proportional", "factor": 2.0}}, "unsupported rotary_scaling"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act"),
    ({"position_embedding_type": "learned_absolute"}, "unsupported position_embedding_type"),
    ({"moe": {"num_experts": 8, "top_k": 2}}, "MoE checkpoints are not supported"),
    ({"quantization": {"quant_algo": "W8A16"}}, "quantized checkpoints are not supported"),
    ({"mapping": {"cp_size": 2}}, r"context parallelism \(mapping.cp_size > 1\) is not supported"),
], ids=["proportional-rope", "gelu", "learned-positions", "moe", "quantized", "cp2"])
def test_unsupported_feature_is_not_run(llama_tp2, tmp_path: Path, patch: dict, feature: str) -> None:
    """A valid checkpoint the runtime cannot execute raises CheckNotRun, which is not a ValueError (a fault)."""
    ckpt = _patched(llama_tp2[1], tmp_path, patch)
    with pytest.raises(CheckNotRun, match=rf"config\.json: {feature}") as raised:
        run_simulated(ckpt, _input_ids(97))
    assert not isinstance(raised.value, ValueError)


def test_a_fault_is_reported_before_an_unsupported_feature(llama_tp2, tmp_path: Path) -> None:
    ckpt = _patched(llama_tp2[1], tmp_path, {"hidden_act": "gelu", "num_attention_heads": 5})
    with pytest.raises(ValueError, match="num_attention_heads=5"):
        ShardedCheckpoint(ckpt)


def test_forward_without_family_is_not_run(llama_tp2, monkeypatch) -> None:
    """An architecture whose card names a forward no family module implements: CheckNotRun, naming it."""
    name = json.loads((llama_tp2[1] / "config.json").read_text())["architecture"]
    card = dataclasses.replace(get_card(name), forward="no-such-forward")
    monkeypatch.setitem(card_module.CARDS.by_name, name, Entry(name, card, __name__))
    with pytest.raises(CheckNotRun, match="no family forward 'no-such-forward'"):
        ShardedCheckpoint(llama_tp2[1])


def test_check_sharded_lets_check_not_run_through(llama_tp2, tmp_path: Path) -> None:
    """The sharded check does not turn an unsupported feature into a structural failure."""
    hf_dir, ckpt_dir = llama_tp2
    ckpt = _patched(ckpt_dir, tmp_path, {"rotary_scaling": {"rope_type": "proportional", "factor": 2.0}})
    with pytest.raises(CheckNotRun, match="unsupported rotary_scaling"):
        check_sharded(ckpt, HFReference(hf_dir, BatchOptions("cpu", num_sequences=1, seq_len=16)))


def test_bad_input_ids(llama_tp2) -> None:
    with pytest.raises(ValueError, match=r"outside \[0, 97\)"):
        run_simulated(llama_tp2[1], torch.tensor([[0, 97]]))
    with pytest.raises(ValueError, match="shape"):
        run_simulated(llama_tp2[1], torch.tensor([1, 2, 3]))


def test_rank_files_are_validated_from_headers_and_read_tensor_by_tensor(llama_tp2, monkeypatch) -> None:
    """Validation reads no tensor data; a run reads each tensor it uses from the file, never a whole file."""
    from shardproof.converter.safetensors_io import TensorReader

    reads: list[str] = []
    real_read = TensorReader.read
    monkeypatch.setattr(TensorReader, "read", lambda self, name: reads.append(name) or real_read(self, name))
    monkeypatch.setattr("safetensors.torch.load_file", None)  # any whole-file load would fail
    ckpt = ShardedCheckpoint(llama_tp2[1])
    ckpt.validate()
    assert reads == []
    run_simulated(ckpt, _input_ids(97))
    expected = [name for rank in range(ckpt.config.world_size) for name in ckpt.family.tensors(ckpt.config, rank)]
    assert sorted(reads) == sorted(expected)  # every tensor read once, in one forward
