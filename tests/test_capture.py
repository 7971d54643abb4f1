"""dump_rank on a plain PyTorch module tree built with the PyTorch backend's names and shapes and loaded by the
backend's rules (written out here, sharing no code with converter/), then verified like a converted checkpoint;
and the two mutants of that backend's weight mappers caught by the sharded mode."""

from __future__ import annotations

import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from shardproof.capture import dump_rank
from shardproof.converter.api import convert
from shardproof.verify.forward import BatchOptions
from shardproof.verify.mutations import PYTORCH_CATALOG
from shardproof.verify.sharded_check import sharded_check
from shardproof.verify.verification import verify_checkpoint
from tests.helpers import random_checkpoint

SIZES = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=2, hidden_size=8, intermediate_size=8,
             num_hidden_layers=3, vocab_size=11)
BATCH = BatchOptions(num_sequences=2, seq_len=16)


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.clone(), requires_grad=False)


def backend_model(hf: dict, tp: int, tp_rank: int, pp: int, pp_rank: int, tied: bool) -> nn.Module:
    """Rank (tp_rank, pp_rank)'s module tree, loaded as the backend's load_weights does: ceil slices per rank,
    fused [q_r; k_r; v_r] with whole KV heads duplicated, [gate_r; up_r], zero-padded vocab rows."""
    L, hd, heads, kv = SIZES["num_hidden_layers"], SIZES["head_dim"], SIZES["num_attention_heads"], SIZES["num_key_value_heads"]
    layers = torch.tensor_split(torch.arange(L), pp)[pp_rank].tolist()

    def rows(t: torch.Tensor, width: int) -> torch.Tensor:  # column split
        return t.reshape(t.shape[0], -1)[tp_rank * width : (tp_rank + 1) * width].reshape(-1, *t.shape[1:])

    def kv_part(t: torch.Tensor) -> torch.Tensor:
        if kv >= tp:
            return rows(t, kv // tp * hd)
        head = tp_rank // (tp // kv)
        return t[head * hd : (head + 1) * hd]

    def vocab(t: torch.Tensor) -> torch.Tensor:
        step = math.ceil(t.shape[0] / tp)
        part = t[tp_rank * step : (tp_rank + 1) * step]
        return torch.cat([part, part.new_zeros(step - part.shape[0], t.shape[1])])

    root, model = nn.Module(), nn.Module()
    root.model = model
    model.layers = nn.ModuleList(nn.Module() for _ in range(L))
    if pp_rank == 0 or (tied and pp_rank == pp - 1):
        model.embed_tokens = nn.Module()
        model.embed_tokens.weight = _param(vocab(hf["model.embed_tokens.weight"]))
    kept = layers + ([layers[-1] + 1] if pp_rank < pp - 1 else [])
    for i in kept:
        p, layer = f"model.layers.{i}.", model.layers[i]
        layer.input_layernorm = nn.Module()
        layer.input_layernorm.weight = _param(hf[p + "input_layernorm.weight"])
        if i not in layers:
            continue  # the next stage's first layer: only its input_layernorm (kept for fusion)
        a, m = p + "self_attn.", p + "mlp."
        layer.self_attn, layer.mlp, layer.post_attention_layernorm = nn.Module(), nn.Module(), nn.Module()
        layer.self_attn.qkv_proj = nn.Module()
        for kind in ("weight", "bias"):
            fused = torch.cat([rows(hf[a + f"q_proj.{kind}"], heads // tp * hd), kv_part(hf[a + f"k_proj.{kind}"]),
                               kv_part(hf[a + f"v_proj.{kind}"])])
            setattr(layer.self_attn.qkv_proj, kind, _param(fused))
        layer.self_attn.o_proj = nn.Module()
        layer.self_attn.o_proj.weight = _param(rows(hf[a + "o_proj.weight"].t(), heads // tp * hd).t())
        width = SIZES["intermediate_size"] // tp
        layer.mlp.gate_up_proj = nn.Module()
        layer.mlp.gate_up_proj.weight = _param(torch.cat([rows(hf[m + "gate_proj.weight"], width),
                                                          rows(hf[m + "up_proj.weight"], width)]))
        layer.mlp.down_proj = nn.Module()
        layer.mlp.down_proj.weight = _param(rows(hf[m + "down_proj.weight"].t(), width).t())
        layer.post_attention_layernorm.weight = _param(hf[p + "post_attention_layernorm.weight"])
    if pp_rank == pp - 1:
        model.norm = nn.Module()
        model.norm.weight = _param(hf["model.norm.weight"])
        root.lm_head = nn.Module()
        root.lm_head.weight = model.embed_tokens.weight if tied else _param(vocab(hf["lm_head.weight"]))
    return root


@pytest.mark.parametrize("tp, pp, tied", [(2, 1, True), (4, 2, False)])
def test_dump_of_a_backend_module_tree_verifies(tp, pp, tied, tmp_path):
    src = random_checkpoint(tmp_path / "src", "Qwen2ForCausalLM", seed=4, **SIZES, tie_word_embeddings=tied)
    hf = load_file(src / "model.safetensors")
    for rank in range(tp * pp):
        mapping = SimpleNamespace(tp_size=tp, pp_size=pp, rank=rank, tp_rank=rank % tp, pp_rank=rank // tp)
        dump_rank(backend_model(hf, tp, rank % tp, pp, rank // tp, tied), tmp_path / "dump", mapping, src)
    result = verify_checkpoint(src, tmp_path / "dump", batch=BATCH, target="trtllm-pytorch")
    assert result.passed, result.failures
    assert result.reassembled.weights.ok and result.sharded.passed


def test_dump_with_a_source_fingerprint_only_plans_from_the_model_dir(tmp_path):
    from shardproof.converter.manifest import source_fingerprint
    from shardproof.converter.source import open_source

    src = random_checkpoint(tmp_path / "src", "Qwen2ForCausalLM", seed=4, **SIZES)
    hf = load_file(src / "model.safetensors")
    for rank in range(2):
        mapping = SimpleNamespace(tp_size=2, pp_size=1, rank=rank)  # tp_rank / pp_rank derived
        dump_rank(backend_model(hf, 2, rank, 1, 0, False), tmp_path / "dump", mapping, source_fingerprint(open_source(src)))
    assert verify_checkpoint(src, tmp_path / "dump", batch=BATCH, target="trtllm-pytorch").passed


def test_dump_missing_a_parameter_fails_reassembly(tmp_path):
    src = random_checkpoint(tmp_path / "src", "Qwen2ForCausalLM", seed=4, **SIZES)
    hf = load_file(src / "model.safetensors")
    for rank in range(2):
        model = backend_model(hf, 2, rank, 1, 0, False)
        del model.model.layers[1].mlp.down_proj.weight
        dump_rank(model, tmp_path / "dump", SimpleNamespace(tp_size=2, pp_size=1, rank=rank), src)
    result = verify_checkpoint(src, tmp_path / "dump", batch=BATCH, target="trtllm-pytorch")
    assert not result.passed
    assert any("model.layers.1.mlp.down_proj.weight" in str(v) for v in result.reassembled.violations)


@pytest.mark.parametrize("mutant", PYTORCH_CATALOG, ids=lambda m: m.name)
def test_pytorch_backend_mutants_are_caught_by_the_sharded_mode(mutant, tmp_path):
    src = random_checkpoint(tmp_path / "src", "Qwen2ForCausalLM", seed=6, **SIZES)
    clean = tmp_path / "clean"
    layout = mutant.layout
    convert(src, clean, dtype=layout.dtype, tp_size=layout.tp_size, pp_size=layout.pp_size, target="trtllm-pytorch")
    assert sharded_check(src, clean, target="trtllm-pytorch").passed
    mutated = tmp_path / "mutated"
    shutil.copytree(clean, mutated)
    mutant.edit(mutated, src)
    report = sharded_check(src, mutated, target="trtllm-pytorch")
    assert not report.passed
    assert report.localization.first_diverging == mutant.diverges_at
