"""Hand-written per-rank expectations for a small GQA model, spelled out head by head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shardproof.converter.api import convert
from tests.helpers import random_checkpoint
from shardproof.converter.reassemble import reassemble

HEAD_DIM = 2
GQA = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM, hidden_size=8, intermediate_size=8,
           num_hidden_layers=3, vocab_size=10)


def heads(tensor: torch.Tensor, *indices: int) -> torch.Tensor:
    return torch.cat([tensor[h * HEAD_DIM : (h + 1) * HEAD_DIM] for h in indices])


@pytest.fixture(scope="module")
def gqa(tmp_path_factory) -> tuple[Path, dict]:
    src = random_checkpoint(tmp_path_factory.mktemp("gqa"), "Qwen2ForCausalLM", seed=7, **GQA)
    return src, load_file(src / "model.safetensors")


def test_tp4_replicates_each_kv_head_on_adjacent_ranks(gqa, tmp_path):
    src, hf = gqa
    convert(src, tmp_path / "trt", dtype="float32", tp_size=4)
    p = "model.layers.1.self_attn."
    for rank in range(4):
        got = load_file(tmp_path / "trt" / f"rank{rank}.safetensors")
        kv_head = rank // 2  # 2 ranks share each of the 2 KV heads
        for kind in ("weight", "bias"):
            want = torch.cat([
                heads(hf[p + f"q_proj.{kind}"], rank),
                heads(hf[p + f"k_proj.{kind}"], kv_head),
                heads(hf[p + f"v_proj.{kind}"], kv_head),
            ])
            assert torch.equal(got[f"transformer.layers.1.attention.qkv.{kind}"], want), (rank, kind)


def test_tp2_gives_each_rank_two_q_heads_and_one_kv_head(gqa, tmp_path):
    src, hf = gqa
    convert(src, tmp_path / "trt", dtype="float32", tp_size=2)
    p = "model.layers.0.self_attn."
    for rank in range(2):
        got = load_file(tmp_path / "trt" / f"rank{rank}.safetensors")
        want = torch.cat([
            heads(hf[p + "q_proj.weight"], 2 * rank, 2 * rank + 1),
            heads(hf[p + "k_proj.weight"], rank),
            heads(hf[p + "v_proj.weight"], rank),
        ])
        assert torch.equal(got["transformer.layers.0.attention.qkv.weight"], want)
        assert torch.equal(got["transformer.layers.0.attention.dense.weight"], hf[p + "o_proj.weight"][:, 4 * rank : 4 * rank + 4])
        assert torch.equal(got["transformer.layers.0.mlp.fc.weight"], hf["model.layers.0.mlp.gate_proj.weight"][4 * rank : 4 * rank + 4])
        assert torch.equal(got["transformer.layers.0.mlp.gate.weight"], hf["model.layers.0.mlp.up_proj.weight"][4 * rank : 4 * rank + 4])
        assert torch.equal(got["transformer.layers.0.mlp.proj.weight"], hf["model.layers.0.mlp.down_proj.weight"][:, 4 * rank : 4 * rank + 4])
        assert torch.equal(got["transformer.layers.0.post_layernorm.weight"], hf["model.layers.0.post_attention_layernorm.weight"])


def test_lm_head_padding_rows_are_zero_and_on_the_last_rank(gqa, tmp_path):
    src, hf = gqa
    convert(src, tmp_path / "trt", dtype="float32", tp_size=4)  # vocab 10 -> 12 rows, 3 per rank
    shards = [load_file(tmp_path / "trt" / f"rank{r}.safetensors")["lm_head.weight"] for r in range(4)]
    assert [s.shape[0] for s in shards] == [3, 3, 3, 3]
    assert torch.equal(torch.cat(shards)[:10], hf["lm_head.weight"])
    assert torch.count_nonzero(shards[3][1:]) == 0
    assert torch.count_nonzero(shards[3][0]) > 0


def test_pipeline_stages_use_local_layer_indices_and_split_first_stages_larger(gqa, tmp_path):
    src, hf = gqa
    convert(src, tmp_path / "trt", dtype="float32", pp_size=2)  # 3 layers -> stages of 2 and 1
    first, last = (load_file(tmp_path / "trt" / f"rank{r}.safetensors") for r in range(2))
    assert {k.split(".")[2] for k in first if k.startswith("transformer.layers.")} == {"0", "1"}
    assert {k.split(".")[2] for k in last if k.startswith("transformer.layers.")} == {"0"}
    assert torch.equal(last["transformer.layers.0.input_layernorm.weight"], hf["model.layers.2.input_layernorm.weight"])
    assert "transformer.vocab_embedding.weight" in first and "transformer.vocab_embedding.weight" not in last
    assert "lm_head.weight" in last and "lm_head.weight" not in first
    assert "transformer.ln_f.weight" in last and "transformer.ln_f.weight" not in first


def test_tied_embedding_becomes_an_explicit_padded_lm_head(tmp_path):
    src = random_checkpoint(tmp_path / "hf", "LlamaForCausalLM", seed=3, **{**GQA, "tie_word_embeddings": True})
    hf = load_file(src / "model.safetensors")
    assert "lm_head.weight" not in hf
    convert(src, tmp_path / "trt", dtype="float16", tp_size=4, pp_size=1)
    shards = [load_file(tmp_path / "trt" / f"rank{r}.safetensors")["lm_head.weight"] for r in range(4)]
    assert torch.equal(torch.cat(shards)[:10], hf["model.embed_tokens.weight"].half())
    assert json.loads((tmp_path / "trt" / "config.json").read_text())["tie_word_embeddings"] is True


@pytest.mark.parametrize("dim", [0, 1])
def test_parallel_embedding_shards_rows_with_padding_or_columns(gqa, tmp_path, dim):
    src, hf = gqa
    convert(src, tmp_path / "trt", dtype="float32", tp_size=4, use_parallel_embedding=True, embedding_sharding_dim=dim)
    shards = [load_file(tmp_path / "trt" / f"rank{r}.safetensors")["transformer.vocab_embedding.weight"] for r in range(4)]
    embedding = hf["model.embed_tokens.weight"]
    if dim == 0:
        assert [tuple(s.shape) for s in shards] == [(3, 8)] * 4
        assert torch.equal(torch.cat(shards)[:10], embedding) and torch.count_nonzero(torch.cat(shards)[10:]) == 0
    else:
        assert [tuple(s.shape) for s in shards] == [(10, 2)] * 4
        assert torch.equal(torch.cat(shards, dim=1), embedding)


def test_row_parallel_bias_is_replicated_whole_and_column_bias_split(tmp_path):
    src = random_checkpoint(tmp_path / "hf", "LlamaForCausalLM", seed=5, attention_bias=True, mlp_bias=True, **GQA)
    hf = load_file(src / "model.safetensors")
    convert(src, tmp_path / "trt", dtype="float32", tp_size=2)
    for rank in range(2):
        got = load_file(tmp_path / "trt" / f"rank{rank}.safetensors")
        assert torch.equal(got["transformer.layers.0.attention.dense.bias"], hf["model.layers.0.self_attn.o_proj.bias"])
        assert torch.equal(got["transformer.layers.0.mlp.proj.bias"], hf["model.layers.0.mlp.down_proj.bias"])
        assert torch.equal(got["transformer.layers.0.mlp.fc.bias"], hf["model.layers.0.mlp.gate_proj.bias"].chunk(2)[rank])


def test_qwen3_qk_norms_are_replicated(tmp_path):
    src = random_checkpoint(tmp_path / "hf", "Qwen3ForCausalLM", seed=9, **{**GQA, "head_dim": 3})
    hf = load_file(src / "model.safetensors")
    convert(src, tmp_path / "trt", dtype="bfloat16", tp_size=2)
    for rank in range(2):
        got = load_file(tmp_path / "trt" / f"rank{rank}.safetensors")
        assert torch.equal(got["transformer.layers.2.attention.q_layernorm.weight"], hf["model.layers.2.self_attn.q_norm.weight"].bfloat16())
        assert got["transformer.layers.2.attention.qkv.weight"].shape == ((2 + 2) * 3, 8)


def test_config_json_fields_match_trtllm(gqa, tmp_path):
    src, _ = gqa
    convert(src, tmp_path / "trt", dtype="auto", tp_size=2, pp_size=3)
    cfg = json.loads((tmp_path / "trt" / "config.json").read_text())
    assert cfg["architecture"] == "Qwen2ForCausalLM" and cfg["dtype"] == "float16"  # auto: float32 -> float16
    assert cfg["vocab_size"] == 10 and cfg["head_size"] == 2 and cfg["num_key_value_heads"] == 2
    assert cfg["position_embedding_type"] == "rope_gpt_neox" and cfg["attn_bias"] is True
    assert cfg["mapping"]["world_size"] == 6 and cfg["mapping"]["tp_size"] == 2 and cfg["mapping"]["pp_size"] == 3
    assert cfg["quantization"]["quant_algo"] is None and cfg["logits_dtype"] == "float32"
    for key in ("hidden_act", "norm_epsilon", "max_position_embeddings", "rotary_base", "rotary_scaling", "mlp_bias",
                "qk_layernorm", "use_parallel_embedding", "embedding_sharding_dim", "tie_word_embeddings", "intermediate_size"):
        assert key in cfg, key


def test_llama3_rope_scaling_is_recorded_and_round_trips(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    src = random_checkpoint(tmp_path / "hf", "LlamaForCausalLM", seed=1, rope_theta=50000.0, rope_scaling=dict(scaling), **GQA)
    convert(src, tmp_path / "trt", dtype="float32")
    cfg = json.loads((tmp_path / "trt" / "config.json").read_text())
    assert cfg["rotary_base"] == 50000.0 and cfg["rotary_scaling"] == scaling
    assert reassemble(tmp_path / "trt", tmp_path / "back").ok
    from transformers import AutoConfig

    back = AutoConfig.from_pretrained(tmp_path / "back")
    assert back.rope_parameters["rope_theta"] == 50000.0 and back.rope_parameters["factor"] == 8.0


def test_reassembler_names_a_diverging_kv_replica(gqa, tmp_path):
    src, _ = gqa
    convert(src, tmp_path / "trt", dtype="float32", tp_size=4)
    path = tmp_path / "trt" / "rank3.safetensors"
    tensors = load_file(path)
    qkv = tensors["transformer.layers.1.attention.qkv.weight"].clone()
    qkv[HEAD_DIM] += 1.0  # first row of rank 3's k head, a replica of rank 2's
    tensors["transformer.layers.1.attention.qkv.weight"] = qkv
    save_file(tensors, path)
    result = reassemble(tmp_path / "trt", tmp_path / "back")
    assert [(v.rank, v.tensor) for v in result.violations] == [(3, "transformer.layers.1.attention.qkv.weight")]
    assert "k replica of KV head 1 differs from tp rank 2" in result.violations[0].problem
