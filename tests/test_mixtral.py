"""Mixtral: experts stacked and split over expert-TP and expert-parallel ranks, the float32 router, the moe
block and mapping in config.json, both verify modes, and a swapped expert order caught by the sharded mode."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

from shardproof.cli import app
from shardproof.converter.api import convert
from shardproof.converter.card import Row, get_card, layer
from shardproof.converter.checkpoint import TRTCheckpoint
from shardproof.converter.errors import CheckNotRun, ShardproofError
from shardproof.converter.mapping import Mapping
from shardproof.converter.reassemble import reassemble
from shardproof.converter.transforms import REPLICATED
from shardproof.verify.forward import BatchOptions
from shardproof.verify.mutations import experts_swapped
from shardproof.verify.runtime.config import load_config
from shardproof.verify.sharded_check import sharded_check
from shardproof.verify.tiny_models import build_tiny_model
from shardproof.verify.verification import convert_and_check
from tests.helpers import load_checkpoint, random_checkpoint
from tests.reference_layout import expected_ranks, reassembled

ARCH = "MixtralForCausalLM"
MOE = "model.layers.{}.block_sparse_moe.experts.{}.{}.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """4 experts, top-2, float32."""
    return build_tiny_model(tmp_path_factory.mktemp("mixtral") / "hf", ARCH, seed=3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=get_card(ARCH).tests.strategy(), seed=st.integers(0, 2**16),
       tp_ep=st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4)]), pp=st.integers(1, 2),
       dtype=st.sampled_from(["float32", "float16", "bfloat16"]))
def test_random_mixtral_configs_match_trtllm_rules_and_reassemble_exactly(config, seed, tp_ep, pp, dtype) -> None:
    tp, ep = tp_ep
    config = {**config, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 16,
              "num_local_experts": max(config["num_local_experts"], ep), "num_hidden_layers": 2}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = random_checkpoint(tmp / "hf", ARCH, seed, dtype="bfloat16", **config)
        convert(src, tmp / "trt", dtype=dtype, tp_size=tp, pp_size=pp, moe_ep_size=ep)
        source, hf_config = load_checkpoint(src), json.loads((src / "config.json").read_text())
        for rank, want in enumerate(expected_ranks(source, hf_config, getattr(torch, dtype), tp, pp, moe_ep=ep)):
            got = load_file(tmp / "trt" / f"rank{rank}.safetensors")
            assert got.keys() == want.keys()
            for name in want:
                assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), (rank, name)
        assert reassemble(tmp / "trt", tmp / "back").ok
        back = load_checkpoint(tmp / "back")
        assert back.keys() == source.keys()
        for name, tensor in source.items():
            assert torch.equal(back[name], reassembled(name, tensor, getattr(torch, dtype), ARCH)), name


def test_expert_parallel_ranks_hold_consecutive_experts(tiny: Path, tmp_path: Path) -> None:
    """tp 4 as ep 2 x moe_tp 2: tp rank r is expert rank r % 2 and expert-TP rank r // 2; expert rank 0 holds
    experts 0 and 1 (of 4), each fc = [w3 half; w1 half] of its moe_tp slice, proj = w2's columns."""
    convert(tiny, tmp_path / "trt", dtype="float32", tp_size=4, moe_ep_size=2)
    source = load_checkpoint(tiny)
    for tp_rank in range(4):
        ep_rank, moe_tp_rank = tp_rank % 2, tp_rank // 2
        rank = load_file(tmp_path / "trt" / f"rank{tp_rank}.safetensors")
        experts = [2 * ep_rank, 2 * ep_rank + 1]
        rows = slice(48 * moe_tp_rank, 48 * (moe_tp_rank + 1))  # intermediate 96 over moe_tp 2
        fc = torch.stack([torch.cat([source[MOE.format(0, e, "w3")][rows], source[MOE.format(0, e, "w1")][rows]])
                          for e in experts])
        proj = torch.stack([source[MOE.format(0, e, "w2")][:, rows] for e in experts])
        assert torch.equal(rank["transformer.layers.0.mlp.fc.weight"], fc)
        assert torch.equal(rank["transformer.layers.0.mlp.proj.weight"], proj)
        assert torch.equal(rank["transformer.layers.0.mlp.router.weight"], source["model.layers.0.block_sparse_moe.gate.weight"])


def test_config_records_moe_and_mapping_and_the_reassembler_reads_them(tiny: Path, tmp_path: Path) -> None:
    convert(tiny, tmp_path / "trt", dtype="bfloat16", tp_size=4, pp_size=2, moe_tp_size=2)
    config = json.loads((tmp_path / "trt" / "config.json").read_text())
    assert config["moe"] == {"num_experts": 4, "top_k": 2, "normalization_mode": 1}
    assert config["hidden_act"] == "swiglu" and config["rotary_base"] == 1e6
    assert (config["mapping"]["moe_tp_size"], config["mapping"]["moe_ep_size"]) == (2, 2)
    assert TRTCheckpoint(tmp_path / "trt").mapping == Mapping(tp_size=4, pp_size=2, moe_tp_size=2, moe_ep_size=2)
    rebuilt = reassemble(tmp_path / "trt", tmp_path / "back")
    assert rebuilt.ok
    hf = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (hf["num_local_experts"], hf["num_experts_per_tok"], hf["hidden_act"]) == (4, 2, "silu")


def test_router_is_float32_in_a_bfloat16_checkpoint(tiny: Path, tmp_path: Path) -> None:
    convert(tiny, tmp_path / "trt", dtype="bfloat16", tp_size=2)
    source = load_checkpoint(tiny)
    for rank in range(2):
        tensors = load_file(tmp_path / "trt" / f"rank{rank}.safetensors")
        router = tensors["transformer.layers.1.mlp.router.weight"]
        assert router.dtype == torch.float32
        assert torch.equal(router, source["model.layers.1.block_sparse_moe.gate.weight"])
        assert tensors["transformer.layers.1.mlp.fc.weight"].dtype == torch.bfloat16


def test_mapping_follows_trtllm_defaults_and_rank_rules() -> None:
    assert (Mapping(tp_size=4).moe_tp_size, Mapping(tp_size=4).moe_ep_size) == (4, 1)
    assert Mapping(tp_size=4, moe_ep_size=4).moe_tp_size == 1
    mapping = Mapping(tp_size=8, moe_tp_size=2)
    assert mapping.moe_ep_size == 4
    assert [(mapping.moe_tp_rank(r), mapping.moe_ep_rank(r)) for r in range(8)] == [
        (r // 4, r % 4) for r in range(8)]
    with pytest.raises(ShardproofError, match="must equal tp_size=4"):
        Mapping(tp_size=4, moe_tp_size=2, moe_ep_size=4)


def test_indivisible_experts_are_refused(tmp_path: Path) -> None:
    src = build_tiny_model(tmp_path / "hf", ARCH, num_local_experts=3)
    with pytest.raises(ShardproofError, match="num_experts=3 is not divisible by moe_ep_size=2"):
        convert(src, tmp_path / "trt", tp_size=2, moe_ep_size=2)
    assert not (tmp_path / "trt").exists()


def test_rows_check_gathered_indices_on_both_sides() -> None:
    with pytest.raises(ValueError, match="gathered index"):
        layer("mlp.fc.weight", "model.layers.{i}.w.weight", shard=REPLICATED, gather=(("e", "num_experts"),))
    with pytest.raises(ValueError):
        layer("mlp.{e}.weight", "model.layers.{i}.{e}.weight", shard=REPLICATED, gather=(("e", "num_experts"),))
    row = Row("t", ("a.{e}", "b.{e}"), REPLICATED, "first", gather=(("e", "num_experts"),))
    dims = type("D", (), {"num_experts": 3})()
    assert row.instances(range(0), dims) == [("t", ("a.0", "a.1", "a.2", "b.0", "b.1", "b.2"))]
    assert row.patterns(dims) == ("a.{e}",) * 3 + ("b.{e}",) * 3


LAYOUTS = [  # (dtype, tp, pp, moe_ep, top_k): top-2 in float32; low precision with every expert on every token
    ("float32", 1, 1, None, 2), ("float32", 2, 2, None, 2), ("float32", 4, 1, 2, 2), ("float32", 4, 2, 4, 2),
    ("bfloat16", 2, 1, 2, 4), ("float16", 4, 2, 2, 4), ("bfloat16", 4, 1, 4, 4),
]


@pytest.mark.parametrize("dtype,tp,pp,ep,top_k", LAYOUTS)
def test_both_verify_modes_pass(tmp_path: Path, dtype: str, tp: int, pp: int, ep: int | None, top_k: int) -> None:
    src = build_tiny_model(tmp_path / "hf", ARCH, seed=1, num_experts_per_tok=top_k)
    result = convert_and_check(src, tmp_path / "trt", "both", BatchOptions("cpu", 2, 64, 0),
                               dtype=dtype, tp_size=tp, pp_size=pp, moe_ep_size=ep)
    assert result.passed, result.failures


def test_swapped_experts_are_caught_by_the_sharded_mode(tiny: Path, tmp_path: Path) -> None:
    convert(tiny, tmp_path / "trt", dtype="float32", tp_size=2, moe_ep_size=2)
    experts_swapped(tmp_path / "trt", tiny)
    report = sharded_check(tiny, tmp_path / "trt", BatchOptions("cpu", 1, 64, 0))
    assert not report.passed and report.localization.first_diverging == "layer 0"


def test_moe_for_a_family_without_experts_is_not_run(tiny: Path, tmp_path: Path) -> None:
    convert(tiny, tmp_path / "trt", dtype="float32")
    path = tmp_path / "trt" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "architecture": "LlamaForCausalLM"}))
    with pytest.raises(CheckNotRun, match="MoE checkpoints are not supported by the 'llama' forward"):
        load_config(path)


def test_cli_takes_the_moe_flags_in_both_spellings(tiny: Path, tmp_path: Path) -> None:
    for flag, out in (("--moe_ep_size", "a"), ("--moe-ep-size", "b")):
        result = CliRunner().invoke(app, ["convert", "--model_dir", str(tiny), "--output_dir", str(tmp_path / out),
                                          "--tp_size", "2", flag, "2"])
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / out / "config.json").read_text())["mapping"]["moe_ep_size"] == 2
