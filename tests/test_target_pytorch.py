"""The trtllm-pytorch target: per-rank parameters as TensorRT-LLM's PyTorch backend holds them, spelled out head by
head; bit-exact round trips, the runtime view and the sharded runtime over every card that declares its rows."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from shardproof.converter.api import convert
from shardproof.converter.card import cards, get_card
from shardproof.converter.errors import ShardproofError
from shardproof.converter.reassemble import reassemble
from shardproof.converter.target import PYTORCH, get_target
from shardproof.converter.transforms import CeilSplit
from shardproof.verify.runtime.target_view import open_sharded
from shardproof.verify.forward import BatchOptions
from shardproof.verify.outcomes import Status
from shardproof.verify.sharded_check import sharded_check
from shardproof.verify.verification import verify_checkpoint
from tests.helpers import load_checkpoint, random_checkpoint

TARGET = PYTORCH.name
HD = 2
GQA = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=HD, hidden_size=8, intermediate_size=8,
           num_hidden_layers=3, vocab_size=11)
BATCH = BatchOptions(device="cpu", num_sequences=1, seq_len=16, seed=0)
SUPPORTED = [card.name for card in cards() if PYTORCH.supports(card)]


def switches(architecture: str) -> dict:
    """The card's self-test switches (biases, ...) that are plain booleans: every optional tensor present."""
    return {k: v for k, v in get_card(architecture).tests.selftest.items() if isinstance(v, bool)}


def refuses_ties(architecture: str) -> bool:
    """The card says its backend model cannot be built tied (a condition on tie_word_embeddings)."""
    return any("tie_word_embeddings" in condition for condition, _ in PYTORCH.rows(get_card(architecture)).refused)


def heads(tensor: torch.Tensor, *indices: int) -> torch.Tensor:
    return torch.cat([tensor[h * HD : (h + 1) * HD] for h in indices])


def test_ceil_split_keeps_a_smaller_last_shard_and_inverts_exactly():
    source = torch.arange(5 * 3.0).reshape(5, 3)
    shard = CeilSplit(0, linear=False)
    parts = [shard.forward([source], 3, r) for r in range(3)]
    assert [p.shape[0] for p in parts] == [2, 2, 1] == [shard.rank_shape([(5, 3)], 3, r)[0] for r in range(3)]
    assert torch.equal(shard.inverse(parts, [(5, 3)])[0][0], source)
    assert CeilSplit(0).check([(5, 3)], 3) is not None  # a Linear asserts divisibility
    bias = torch.arange(4.0)
    assert torch.equal(CeilSplit(1).forward([bias], 2, 1), bias)  # a row-parallel 1-D tensor stays whole


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    src = random_checkpoint(tmp_path_factory.mktemp("qwen2"), "Qwen2ForCausalLM", seed=7, **GQA)
    return src, load_file(src / "model.safetensors")


def test_tp4_fuses_qkv_per_rank_with_whole_kv_heads_duplicated(qwen2, tmp_path):
    src, hf = qwen2
    convert(src, tmp_path / "pt", dtype="float32", tp_size=4, target=TARGET)
    p = "model.layers.1.self_attn."
    for rank in range(4):
        got = load_file(tmp_path / "pt" / f"rank{rank}.safetensors")
        kv_head = rank // 2
        for kind in ("weight", "bias"):  # the bias too: whole heads, not repeat_interleave'd elements
            want = torch.cat([heads(hf[p + f"q_proj.{kind}"], rank), heads(hf[p + f"k_proj.{kind}"], kv_head),
                              heads(hf[p + f"v_proj.{kind}"], kv_head)])
            assert torch.equal(got[p + f"qkv_proj.{kind}"], want), (rank, kind)
        assert torch.equal(got[p + "o_proj.weight"], hf[p + "o_proj.weight"][:, 2 * rank : 2 * rank + 2])


def test_tp2_gate_up_is_gate_then_up_and_down_proj_is_row_parallel(qwen2, tmp_path):
    src, hf = qwen2
    convert(src, tmp_path / "pt", dtype="float32", tp_size=2, target=TARGET)
    mlp = "model.layers.2.mlp."
    for rank in range(2):
        got = load_file(tmp_path / "pt" / f"rank{rank}.safetensors")
        rows = slice(4 * rank, 4 * rank + 4)
        want = torch.cat([hf[mlp + "gate_proj.weight"][rows], hf[mlp + "up_proj.weight"][rows]])
        assert torch.equal(got[mlp + "gate_up_proj.weight"], want)
        assert torch.equal(got[mlp + "down_proj.weight"], hf[mlp + "down_proj.weight"][:, rows])


def test_odd_vocabulary_is_split_in_ceil_rows_with_zero_padding(qwen2, tmp_path):
    src, hf = qwen2
    convert(src, tmp_path / "pt", dtype="float32", tp_size=4, target=TARGET)
    step = math.ceil(11 / 4)
    for rank in range(4):
        got = load_file(tmp_path / "pt" / f"rank{rank}.safetensors")
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            part = hf[name][rank * step : (rank + 1) * step]
            want = torch.cat([part, torch.zeros(step - part.shape[0], 8)])
            assert torch.equal(got[name], want), (rank, name)


def test_pipeline_stages_hold_their_global_layers_and_the_next_input_norm(tmp_path):
    src = random_checkpoint(tmp_path / "src", "LlamaForCausalLM", seed=3, **{**GQA, "tie_word_embeddings": True})
    hf = load_file(src / "model.safetensors")
    convert(src, tmp_path / "pt", dtype="float32", tp_size=1, pp_size=2, target=TARGET)
    first, last = (load_file(tmp_path / "pt" / f"rank{r}.safetensors") for r in range(2))
    assert {n.split(".")[2] for n in first if n.startswith("model.layers.")} == {"0", "1", "2"}
    assert [n for n in first if n.startswith("model.layers.2.")] == ["model.layers.2.input_layernorm.weight"]
    assert {n.split(".")[2] for n in last if n.startswith("model.layers.")} == {"2"}
    # tied: no lm_head parameter; the last stage keeps the embedding, which is the lm_head
    assert "lm_head.weight" not in first | last
    assert torch.equal(last["model.embed_tokens.weight"], hf["model.embed_tokens.weight"])
    assert "model.norm.weight" in last and "model.norm.weight" not in first


@pytest.mark.parametrize("architecture", SUPPORTED)
def test_round_trip_is_bit_exact_at_every_layout(architecture, tmp_path):
    for tied in (False, True):
        src = random_checkpoint(tmp_path / f"src{tied}", architecture, seed=5, **{
            **GQA, "num_attention_heads": 8, "hidden_size": 8 * HD, "tie_word_embeddings": tied,
            **switches(architecture)})
        source = load_checkpoint(src)
        if tied and refuses_ties(architecture):
            with pytest.raises(ShardproofError, match="tie_word_embeddings.*cannot be laid out"):
                convert(src, tmp_path / "refused", dtype="float32", target=TARGET)
            assert not (tmp_path / "refused").exists()
            continue
        for tp in (1, 2, 4, 8):
            for pp in (1, 2):
                out, back = tmp_path / f"pt{tied}{tp}{pp}", tmp_path / f"hf{tied}{tp}{pp}"
                convert(src, out, dtype="float32", tp_size=tp, pp_size=pp, target=TARGET)
                result = reassemble(out, back, target=TARGET)
                assert result.ok, result.violations
                rebuilt = load_checkpoint(back)
                expected = {k: v for k, v in source.items() if not (tied and k == "lm_head.weight")}
                assert rebuilt.keys() == expected.keys()
                assert all(torch.equal(rebuilt[k], v) for k, v in expected.items()), (tp, pp)


@pytest.mark.parametrize("architecture", SUPPORTED)
def test_runtime_view_is_the_checkpoint_targets_rank_files_bit_for_bit(architecture, tmp_path):
    """The view derived from the two plans gives each rank exactly the tensors the checkpoint target writes for
    that rank (with the embedding as the target holds it), whatever fusing and reordering lies between."""
    src = random_checkpoint(tmp_path / "src", architecture, seed=4, **{**GQA, **switches(architecture)})
    convert(src, tmp_path / "pt", dtype="float32", tp_size=4, pp_size=2, target=TARGET)
    view = open_sharded(tmp_path / "pt", TARGET)
    convert(src, tmp_path / "trt", dtype="float32", tp_size=4, pp_size=2,
            use_parallel_embedding=view.config.use_parallel_embedding)
    for rank in range(8):
        want = load_file(tmp_path / "trt" / f"rank{rank}.safetensors")
        got = view.file(rank)
        assert got.shapes.keys() == want.keys()
        assert all(got.dtype(k) == want[k].dtype and torch.equal(got.read(k), want[k]) for k in want), rank


@pytest.mark.parametrize("architecture", SUPPORTED)
def test_both_verify_modes_pass_the_target_at_every_layout(architecture, tmp_path):
    """tp 1, 2, 4, 8 (8 > the 2 KV heads: duplicated) by pp 1, 2, an odd vocabulary (ceil rows, a smaller last
    shard), tied embeddings wherever the card's backend model can be built tied."""
    for tied in (False, True):
        if tied and refuses_ties(architecture):
            continue
        src = random_checkpoint(tmp_path / f"src{tied}", architecture, seed=2, **{
            **GQA, "num_attention_heads": 8, "hidden_size": 8 * HD, "vocab_size": 13, "tie_word_embeddings": tied})
        for tp in (1, 2, 4, 8):
            for pp in (1, 2):
                out = tmp_path / f"pt{tied}{tp}{pp}"
                convert(src, out, dtype="float32", tp_size=tp, pp_size=pp, target=TARGET)
                result = verify_checkpoint(src, out, "both", BATCH, target=TARGET)
                assert result.status is Status.PASSED, (tied, tp, pp, result.failures, result.not_run)


def test_swapped_gate_up_halves_fail_the_sharded_runtime(qwen2, tmp_path):
    from safetensors.torch import save_file

    src, _ = qwen2
    out = tmp_path / "pt"
    convert(src, out, dtype="float32", tp_size=2, target=TARGET)
    path = out / "rank1.safetensors"
    tensors = load_file(path)
    name = "model.layers.0.mlp.gate_up_proj.weight"
    gate, up = tensors[name].chunk(2)
    tensors[name] = torch.cat([up, gate])
    save_file(tensors, path)
    report = sharded_check(src, out, target=TARGET)
    assert not report.passed
    assert report.localization.first_diverging == "layer 0"


def test_cards_without_a_pytorch_backend_model_are_refused(tmp_path):
    refused = [card.name for card in cards() if not PYTORCH.supports(card)]
    assert {"GemmaForCausalLM", "GPT2LMHeadModel"} <= set(refused)
    src = random_checkpoint(tmp_path / "src", "GemmaForCausalLM", seed=1, **{**GQA, "tie_word_embeddings": True})
    with pytest.raises(ShardproofError, match="no GemmaForCausalLM model"):
        convert(src, tmp_path / "out", target=TARGET)
    assert not (tmp_path / "out").exists()


def test_unknown_target_is_refused():
    with pytest.raises(ShardproofError, match=r"no target named .trtllm-engine. \(registered: trtllm-checkpoint, trtllm-pytorch"):
        get_target("trtllm-engine")


def test_pre_fused_phi3_sources_are_re_fused_per_rank_in_hf_order(tmp_path):
    """Phi-3 stores qkv_proj and gate_up_proj fused; the backend slices them and loads the parts through the fused
    modules (modeling_phi3.py load_weights): [q_r; k_r; v_r] with whole KV heads, and [gate_r; up_r]."""
    src = random_checkpoint(tmp_path / "src", "Phi3ForCausalLM", seed=9, **GQA)
    hf = load_file(src / "model.safetensors")
    convert(src, tmp_path / "pt", dtype="float32", tp_size=4, target=TARGET)
    p = "model.layers.1."
    q, k, v = hf[p + "self_attn.qkv_proj.weight"].split([4 * HD, 2 * HD, 2 * HD])
    gate, up = hf[p + "mlp.gate_up_proj.weight"].chunk(2)
    for rank in range(4):
        got = load_file(tmp_path / "pt" / f"rank{rank}.safetensors")
        want = torch.cat([heads(q, rank), heads(k, rank // 2), heads(v, rank // 2)])
        assert torch.equal(got[p + "self_attn.qkv_proj.weight"], want), rank
        rows = slice(2 * rank, 2 * rank + 2)
        assert torch.equal(got[p + "mlp.gate_up_proj.weight"], torch.cat([gate[rows], up[rows]])), rank


def test_mixtral_experts_are_stacked_per_expert_rank_and_the_router_kept_in_the_model_dtype(tmp_path):
    """The fused MoE's VANILLA load (quantization.py FusedMoEMethodBase): rank r holds experts of its expert rank
    (r % moe_ep), each [w3_r; w1_r] and w2_r split by its expert-TP rank (r // moe_ep); the router and the
    embedding are whole on every rank, the router in the model's dtype (modeling_mixtral.py)."""
    src = random_checkpoint(tmp_path / "src", "MixtralForCausalLM", seed=6, dtype="bfloat16",
                            **{**GQA, "num_local_experts": 4, "num_experts_per_tok": 2})
    hf = load_file(src / "model.safetensors")
    out = tmp_path / "pt"
    convert(src, out, dtype="bfloat16", tp_size=4, moe_ep_size=2, target=TARGET)
    moe = p = "model.layers.2.block_sparse_moe."
    for rank in range(4):
        got = load_file(out / f"rank{rank}.safetensors")
        experts, half = (2 * (rank % 2), 2 * (rank % 2) + 1), slice(4 * (rank // 2), 4 * (rank // 2) + 4)
        w3_w1 = torch.stack([torch.cat([hf[f"{moe}experts.{e}.w3.weight"][half], hf[f"{moe}experts.{e}.w1.weight"][half]])
                             for e in experts])
        w2 = torch.stack([hf[f"{moe}experts.{e}.w2.weight"][:, half] for e in experts])
        assert torch.equal(got[p + "experts.w3_w1_weight"], w3_w1), rank
        assert torch.equal(got[p + "experts.w2_weight"], w2), rank
        assert got[p + "gate.weight"].dtype == torch.bfloat16
        assert torch.equal(got[p + "gate.weight"], hf[moe + "gate.weight"])
        assert torch.equal(got["model.embed_tokens.weight"], hf["model.embed_tokens.weight"])
    report = sharded_check(src, out, target=TARGET)
    assert report.passed, report.failures


def test_rank_metadata_of_format_1_with_sha256_digests_is_still_read(qwen2, tmp_path):
    """rank{N}.json of format 1 (before BLAKE3) holds the source's SHA-256 digests under the key `sha256`: still
    read, as SHA-256 digests, and the checkpoint still verifies; a digest under neither key is one line of bad
    input naming the file."""
    import json

    from shardproof.converter.digests import file_digest
    from shardproof.converter.rank_metadata import read_rank_metadata

    src, out = qwen2[0], tmp_path / "pt"
    convert(src, out, dtype="float32", tp_size=2, target=TARGET)
    for path in sorted(out.glob("rank*.json")):
        data = json.loads(path.read_text())
        assert data["format"] == 2 and {d["scheme"] for d in data["source"].values()} == {"blake3", "safetensors-blake3"}
        old = {name: file_digest(src / name, d["scheme"].replace("blake3", "sha256")) for name, d in data["source"].items()}
        data.update(format=1, source={n: {"sha256": d.digest, "size": d.size, "scheme": d.scheme} for n, d in old.items()})
        path.write_text(json.dumps(data))
    (out / "shardproof-manifest.json").unlink()  # it fingerprints the rank{N}.json as written
    metadata = read_rank_metadata(out, TARGET)
    assert metadata[0].source == old and {d.scheme for d in old.values()} == {"sha256", "safetensors-sha256"}
    assert verify_checkpoint(src, out, "both", BATCH, target=TARGET).status is Status.PASSED
    data = json.loads((out / "rank1.json").read_text())
    data["source"]["config.json"] = {"md5": "0" * 64, "size": 1, "scheme": "sha256"}
    (out / "rank1.json").write_text(json.dumps(data))
    with pytest.raises(ShardproofError, match=r"rank1\.json: source\['config\.json'\] is not a digest"):
        read_rank_metadata(out, TARGET)
