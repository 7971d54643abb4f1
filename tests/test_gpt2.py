"""GPT2LMHeadModel: per-rank layout written out by hand, config refusals, the runtime against HF, both verify modes.

The hand-written expectations read HF's Conv1D weights `[in, out]` directly (`w[:, cols]` is `w.T[rows]`), so a
transposition or a c_attn split done wrong cannot agree with them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from shardproof.cli import EXIT_OK, app
from shardproof.converter.api import convert
from shardproof.converter.errors import ShardproofError
from shardproof.converter.reassemble import reassemble
from shardproof.verify.runtime.simulated import run_simulated
from shardproof.verify.tiny_models import build_tiny_model
from tests.helpers import load_checkpoint, random_checkpoint

GPT2 = "GPT2LMHeadModel"
HEAD_DIM = 2
SMALL = dict(num_attention_heads=4, num_key_value_heads=4, hidden_size=8, intermediate_size=16, num_hidden_layers=3,
             vocab_size=11, max_position_embeddings=7)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    src = random_checkpoint(tmp_path_factory.mktemp("gpt2"), GPT2, seed=11, **SMALL)
    return src, load_checkpoint(src)


def test_c_attn_is_transposed_and_resplit_into_each_ranks_q_k_v_heads(small, tmp_path) -> None:
    src, hf = small
    convert(src, tmp_path / "trt", dtype="float32", tp_size=2)
    w, b = hf["transformer.h.1.attn.c_attn.weight"], hf["transformer.h.1.attn.c_attn.bias"]  # [8, 24], [24]
    for rank in range(2):
        got = load_file(tmp_path / "trt" / f"rank{rank}.safetensors")
        # rank r holds heads 2r and 2r + 1 of q (columns 0..7), k (8..15) and v (16..23): 4 columns of each
        cols = [c for part in (0, 8, 16) for c in range(part + 4 * rank, part + 4 * rank + 4)]
        assert torch.equal(got["transformer.layers.1.attention.qkv.weight"], w[:, cols].T)
        assert torch.equal(got["transformer.layers.1.attention.qkv.bias"], b[cols])


def test_conv1d_weights_are_transposed_then_split_and_row_biases_kept_whole(small, tmp_path) -> None:
    src, hf = small
    convert(src, tmp_path / "trt", dtype="float32", tp_size=2)
    p, t = "transformer.h.0.", "transformer.layers.0."
    for rank in range(2):
        got = load_file(tmp_path / "trt" / f"rank{rank}.safetensors")
        dense_in = slice(4 * rank, 4 * rank + 4)  # attention.dense is row-parallel: its input columns
        ffn = slice(8 * rank, 8 * rank + 8)
        assert torch.equal(got[t + "attention.dense.weight"], hf[p + "attn.c_proj.weight"][dense_in, :].T)
        assert torch.equal(got[t + "attention.dense.bias"], hf[p + "attn.c_proj.bias"])
        assert torch.equal(got[t + "mlp.fc.weight"], hf[p + "mlp.c_fc.weight"][:, ffn].T)
        assert torch.equal(got[t + "mlp.fc.bias"], hf[p + "mlp.c_fc.bias"][ffn])
        assert torch.equal(got[t + "mlp.proj.weight"], hf[p + "mlp.c_proj.weight"][ffn, :].T)
        assert torch.equal(got[t + "mlp.proj.bias"], hf[p + "mlp.c_proj.bias"])
        for hf_norm, norm in (("ln_1", "input_layernorm"), ("ln_2", "post_layernorm")):
            for kind in ("weight", "bias"):
                assert torch.equal(got[t + f"{norm}.{kind}"], hf[p + f"{hf_norm}.{kind}"])


def test_positions_on_the_first_stage_ln_f_and_tied_lm_head_on_the_last(small, tmp_path) -> None:
    src, hf = small
    convert(src, tmp_path / "trt", dtype="float32", tp_size=2, pp_size=2, use_parallel_embedding=True)
    first, last = (load_file(tmp_path / "trt" / f"rank{r}.safetensors") for r in (1, 3))
    wpe, wte = hf["transformer.wpe.weight"], hf["transformer.wte.weight"]  # 7 and 11 rows: padded to 8 and 12
    assert torch.equal(first["transformer.position_embedding.weight"], torch.cat([wpe[4:], torch.zeros(1, 8)]))
    assert torch.equal(first["transformer.vocab_embedding.weight"], torch.cat([wte[6:], torch.zeros(1, 8)]))
    assert not any(name.startswith(("lm_head", "transformer.ln_f")) for name in first)
    assert torch.equal(last["lm_head.weight"], torch.cat([wte[6:], torch.zeros(1, 8)]))
    assert torch.equal(last["transformer.ln_f.bias"], hf["transformer.ln_f.bias"])
    assert not any("embedding" in name for name in last)


def test_config_records_learned_positions_and_gelu_new(small, tmp_path) -> None:
    src, _ = small
    convert(src, tmp_path / "trt", dtype="float32")
    cfg = json.loads((tmp_path / "trt" / "config.json").read_text())
    assert cfg["architecture"] == GPT2 and cfg["gpt_variant"] == "gpt2"
    assert cfg["position_embedding_type"] == "learned_absolute" and cfg["hidden_act"] == "gelu_new"
    assert cfg["bias"] is True and cfg["max_position_embeddings"] == 7 and cfg["intermediate_size"] == 16
    assert cfg["num_key_value_heads"] == cfg["num_attention_heads"] == 4 and cfg["head_size"] == HEAD_DIM


def test_untied_lm_head_is_the_sources_own(tmp_path) -> None:
    src = random_checkpoint(tmp_path / "hf", GPT2, seed=2, **SMALL, tie_word_embeddings=False)
    convert(src, tmp_path / "trt", dtype="float32")
    got = load_file(tmp_path / "trt" / "rank0.safetensors")
    assert torch.equal(got["lm_head.weight"], load_checkpoint(src)["lm_head.weight"])
    assert reassemble(tmp_path / "trt", tmp_path / "back").ok


@pytest.mark.parametrize("field, value", [("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False),
                                          ("add_cross_attention", True)])
def test_math_tensorrt_llm_cannot_express_is_refused(tmp_path, field, value) -> None:
    src = random_checkpoint(tmp_path / "hf", GPT2, seed=1, **SMALL)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ShardproofError, match=field):
        convert(src, tmp_path / "trt")
    assert not (tmp_path / "trt").exists()


def test_precision_only_switch_is_accepted_and_unknown_field_refused(tmp_path) -> None:
    src = random_checkpoint(tmp_path / "hf", GPT2, seed=1, **SMALL, reorder_and_upcast_attn=True)
    assert convert(src, tmp_path / "trt").ignored_fields["reorder_and_upcast_attn"].startswith("computes the same")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "alibi": True}))
    with pytest.raises(ShardproofError, match="alibi"):
        convert(src, tmp_path / "trt2")


@pytest.mark.parametrize("layout", [dict(tp_size=1), dict(tp_size=2, pp_size=2, use_parallel_embedding=True),
                                    dict(tp_size=4, use_parallel_embedding=True, embedding_sharding_dim=1)],
                         ids=["tp1", "tp2-pp2-emb0", "tp4-emb1"])
def test_runtime_matches_hf_float32_layer_by_layer(tmp_path, layout) -> None:
    hf_dir = build_tiny_model(tmp_path / "hf", GPT2, seed=4)
    convert(hf_dir, tmp_path / "trt", dtype="float32", **layout)
    ids = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    logits, hidden = run_simulated(tmp_path / "trt", ids, return_hidden=True)
    scale = out.logits.abs().max()
    assert (logits - out.logits).abs().max() / scale < 1e-5
    for i, h in enumerate(hidden[:-1]):  # HF's hidden_states[i + 1] is after layer i; its last is after ln_f
        assert (h - out.hidden_states[i + 1]).abs().max() / out.hidden_states[i + 1].abs().max() < 1e-5, i
    with torch.no_grad():
        final = model.transformer.ln_f(hidden[-1])
    assert (final - out.hidden_states[-1]).abs().max() / out.hidden_states[-1].abs().max() < 1e-5


def test_runtime_adds_the_learned_positions(tmp_path) -> None:
    """Zeroing the position table moves the logits far: the positions are read and added, not ignored."""
    hf_dir = build_tiny_model(tmp_path / "hf", GPT2, seed=4)
    convert(hf_dir, tmp_path / "trt", dtype="float32", tp_size=2)
    ids = torch.randint(0, 97, (1, 32), generator=torch.Generator().manual_seed(0))
    before = run_simulated(tmp_path / "trt", ids)
    tampered = shutil.copytree(tmp_path / "trt", tmp_path / "tampered")
    for path in tampered.glob("rank*.safetensors"):
        tensors = load_file(path)
        tensors["transformer.position_embedding.weight"].zero_()
        save_file(tensors, path)
    after = run_simulated(tampered, ids)
    assert (after - before).abs().max() / before.abs().max() > 1e-2


LAYOUTS = [
    dict(dtype="float32", tp_size=1, pp_size=1),
    dict(dtype="float16", tp_size=2, pp_size=2),
    dict(dtype="bfloat16", tp_size=4, pp_size=1),
    dict(dtype="float32", tp_size=4, pp_size=2, use_parallel_embedding=True),
    dict(dtype="bfloat16", tp_size=2, pp_size=1, use_parallel_embedding=True, embedding_sharding_dim=1),
    dict(dtype="float16", tp_size=1, pp_size=2),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: "-".join(f"{v}" for v in layout.values()))
def test_both_verify_modes_pass(tmp_path, layout) -> None:
    hf_dir = build_tiny_model(tmp_path / "hf", GPT2, seed=6)
    convert(hf_dir, tmp_path / "trt", **layout)
    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(app, [
        "verify", "--model_dir", str(hf_dir), "--checkpoint_dir", str(tmp_path / "trt"), "--mode", "both",
        "--device", "cpu", "--num-sequences", "2", "--seq-len", "32", "--report", str(report_path)])
    assert result.exit_code == EXIT_OK, result.output
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["sharded"]["passed"] and report["reassembled"]["passed"]
