"""Property tests over every registered card: random configs (the card's own strategy), TP/PP layouts, dtypes.

Valid layouts are drawn by construction (tp from the sizes the heads, KV heads and widths allow; pp up to the
layer count), so nearly every draw converts. For each: each rank file equals, bit for bit, what TensorRT-LLM's
rules make (tests/reference_layout, for the families it transcribes), and reassembly gives back the source
cast to the checkpoint dtype, bit for bit. A separate test draws layouts freely and requires every invalid
one to raise ShardproofError naming the number at fault, before anything is written.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from shardproof.converter.api import convert
from shardproof.converter.card import cards, get_card
from shardproof.converter.errors import ShardproofError
from shardproof.converter.reassemble import reassemble
from shardproof.converter.target import get_target
from tests.helpers import load_checkpoint, random_checkpoint
from shardproof.converter.api import plan_conversion
from tests.reference_layout import FORCED_EMBEDDING, ORACLE, expected_ranks, reassembled

PROPERTY_SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TP_SIZES = (1, 2, 4, 8)


@st.composite
def models(draw, architecture: str | None = None):
    """A registered architecture (or the given one), a config from its card's strategy, and a source dtype."""
    name = architecture or draw(st.sampled_from([card.name for card in cards()]))
    config = draw(get_card(name).tests.strategy())
    return name, config, draw(st.sampled_from(["float32", "bfloat16"]))


def why_invalid(arch: str, config: dict, layout: dict) -> list[str]:
    """What the error must mention when TensorRT-LLM's rules cannot lay this model out (empty when they can).

    Computed independently of converter/; when several numbers are wrong, the error may name any of them.
    """
    tp, kv = layout["tp_size"], config["num_key_value_heads"]
    experts = config.get("num_local_experts")
    moe_ep = layout.get("moe_ep_size") or 1
    moe_tp = tp // moe_ep
    embedding_split = (arch not in FORCED_EMBEDDING and layout.get("use_parallel_embedding")
                       and layout.get("embedding_sharding_dim") == 1)
    reasons = {
        "num_attention_heads": config["num_attention_heads"] % tp != 0,
        "num_key_value_heads": kv % tp != 0 and tp % kv != 0,
        "dimension 0": not experts and config["intermediate_size"] % tp != 0,
        "intermediate_size": bool(experts) and config["intermediate_size"] % moe_tp != 0,
        "num_experts": bool(experts) and experts % moe_ep != 0,
        "pp_size": layout["pp_size"] > config["num_hidden_layers"],
        "dimension 1": embedding_split and config["hidden_size"] % tp != 0,
    }
    return [reason for reason, broken in reasons.items() if broken]


@st.composite
def valid_layouts(draw, arch: str, config: dict):
    """A layout TensorRT-LLM's rules can apply to `config`, by construction."""
    parallel, dim = draw(st.booleans()), draw(st.sampled_from([0, 1]))
    base = dict(use_parallel_embedding=parallel, embedding_sharding_dim=dim, pp_size=1)
    tps = [tp for tp in TP_SIZES if not why_invalid(arch, config, {**base, "tp_size": tp})]
    tp = draw(st.sampled_from(tps))
    moe = {}
    if "num_local_experts" in config:  # experts split as ep x moe_tp over the TP group
        eps = [ep for ep in TP_SIZES if tp % ep == 0
               and not why_invalid(arch, config, {**base, "tp_size": tp, "moe_ep_size": ep})]
        moe = dict(moe_ep_size=draw(st.sampled_from(eps)))
    return dict(
        dtype=draw(st.sampled_from(["auto", "float32", "float16", "bfloat16"])),
        tp_size=tp,
        pp_size=draw(st.integers(1, min(4, config["num_hidden_layers"]))),
        use_parallel_embedding=parallel,
        embedding_sharding_dim=dim,
        **moe,
    )


def checkpoint_dtype(requested: str, source_dtype: str) -> str:
    if requested != "auto":
        return requested
    return "float16" if source_dtype == "float32" else source_dtype


@PROPERTY_SETTINGS
@given(model=models(), seed=st.integers(0, 2**16), shards=st.sampled_from([1, 2]), data=st.data())
def test_conversion_matches_trtllm_rules_and_reassembles_exactly(model, seed, shards, data):
    arch, config, source_dtype = model
    layout = data.draw(valid_layouts(arch, config))
    event(f"tp={layout['tp_size']} pp={layout['pp_size']}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = random_checkpoint(tmp / "hf", arch, seed, dtype=source_dtype, shards=shards, **config)
        convert(src, tmp / "trt", **layout)
        dtype = getattr(torch, checkpoint_dtype(layout["dtype"], source_dtype))
        source = load_checkpoint(src)
        if arch in ORACLE:
            hf_config = json.loads((src / "config.json").read_text())
            expected = expected_ranks(
                source, hf_config, dtype, layout["tp_size"], layout["pp_size"],
                layout["use_parallel_embedding"], layout["embedding_sharding_dim"], moe_ep=layout.get("moe_ep_size"),
            )
            for rank, want in enumerate(expected):
                got = load_file(tmp / "trt" / f"rank{rank}.safetensors")
                assert got.keys() == want.keys(), f"rank {rank}: {sorted(got.keys() ^ want.keys())}"
                for name in want:
                    assert got[name].dtype == want[name].dtype
                    assert torch.equal(got[name], want[name]), f"rank {rank}: {name}"

        result = reassemble(tmp / "trt", tmp / "back")
        assert result.ok, result.violations
        back = load_checkpoint(tmp / "back")
        assert back.keys() == source.keys()
        # families the oracle does not transcribe are held to the round trip their card declares
        declared = plan_conversion(src, **layout)[0].reassembled_value
        for name, tensor in source.items():
            want = reassembled(name, tensor, dtype, arch) if arch in ORACLE else declared(name, tensor)
            assert torch.equal(back[name], want), name


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(model=models(), seed=st.integers(0, 2**16), tp=st.sampled_from(TP_SIZES), pp=st.integers(1, 5),
       parallel=st.booleans(), dim=st.sampled_from([0, 1]))
def test_invalid_layouts_are_refused_before_anything_is_written(model, seed, tp, pp, parallel, dim):
    arch, config, source_dtype = model
    layout = dict(tp_size=tp, pp_size=pp, use_parallel_embedding=parallel, embedding_sharding_dim=dim)
    reasons = why_invalid(arch, config, layout)
    assume(reasons)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = random_checkpoint(tmp / "hf", arch, seed, dtype=source_dtype, **config)
        with pytest.raises(ShardproofError, match="|".join(reasons)):
            convert(src, tmp / "trt", **layout)
        assert not (tmp / "trt").exists()


@settings(max_examples=15, deadline=None)
@given(model=models(), seed=st.integers(0, 2**16), data=st.data())
def test_two_layouts_reassemble_to_identical_tensors(model, seed, data):
    arch, config, source_dtype = model
    first, second = (dict(data.draw(valid_layouts(arch, config)), dtype="bfloat16") for _ in range(2))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = random_checkpoint(tmp / "hf", arch, seed, dtype=source_dtype, **config)
        rebuilt = []
        for i, layout in enumerate((first, second)):
            convert(src, tmp / f"trt{i}", **layout)
            assert reassemble(tmp / f"trt{i}", tmp / f"back{i}").ok
            rebuilt.append(load_checkpoint(tmp / f"back{i}"))
        assert rebuilt[0].keys() == rebuilt[1].keys()
        for name in rebuilt[0]:
            assert torch.equal(rebuilt[0][name], rebuilt[1][name]), name


PYTORCH_TARGET = "trtllm-pytorch"
PYTORCH_CARDS = [card.name for card in cards() if get_target(PYTORCH_TARGET).supports(card)]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(architecture=st.sampled_from(PYTORCH_CARDS), seed=st.integers(0, 2**16), data=st.data())
def test_the_pytorch_backend_target_reassembles_exactly(architecture, seed, data):
    """Every card with PyTorch-backend rows, random configs and layouts: the target's rank files reassemble, bit for
    bit, to the round trip its plan declares. A model the target refuses (its card says why) is not drawn again."""
    arch, config, source_dtype = data.draw(models(architecture))
    layout = data.draw(valid_layouts(arch, config))
    event(f"{arch} tp={layout['tp_size']} pp={layout['pp_size']}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = random_checkpoint(tmp / "hf", arch, seed, dtype=source_dtype, **config)
        try:
            plan, _ = plan_conversion(src, target=PYTORCH_TARGET, **layout)
        except ShardproofError as e:
            assume(PYTORCH_TARGET not in str(e))  # a refusal the card declares for this target
            raise
        convert(src, tmp / "pt", target=PYTORCH_TARGET, **layout)
        result = reassemble(tmp / "pt", tmp / "back", target=PYTORCH_TARGET)
        assert result.ok, result.violations
        back, source = load_checkpoint(tmp / "back"), load_checkpoint(src)
        expected = {name: plan.reassembled_value(name, tensor) for name, tensor in source.items() if name in back}
        assert back.keys() == expected.keys() and set(source) - set(back) <= set(plan.skipped)
        for name, tensor in expected.items():
            assert torch.equal(back[name], tensor), name
