"""Property tests over random Llama-family models, TP/PP layouts and dtypes.

For every valid draw: each rank file equals, bit for bit, what TensorRT-LLM's rules make (tests/reference_layout),
and reassembly gives back the source cast to the checkpoint dtype, bit for bit. Every invalid draw raises
ShardproofError before anything is written.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from shardproof.converter.api import convert
from shardproof.converter.errors import ShardproofError
from tests.helpers import load_checkpoint, random_checkpoint
from tests.reference_layout import cast, expected_ranks
from shardproof.verify.reassemble import reassemble

ARCHITECTURES = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM"]
PROPERTY_SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def models(draw):
    """A random architecture and config: GQA ratios, head_dim != hidden/heads, odd vocab, ties, biases."""
    arch = draw(st.sampled_from(ARCHITECTURES))
    kv = draw(st.sampled_from([1, 2, 4]))
    heads = kv * draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([4, 6, 8]))
    config = dict(
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        hidden_size=heads * draw(st.integers(1, 5)),  # transformers requires a multiple of heads
        intermediate_size=8 * draw(st.integers(2, 6)),
        num_hidden_layers=draw(st.integers(1, 4)),
        vocab_size=draw(st.integers(17, 131)),
        tie_word_embeddings=draw(st.booleans()),
    )
    if arch in ("LlamaForCausalLM", "GemmaForCausalLM", "Qwen3ForCausalLM"):
        config.update(attention_bias=draw(st.booleans()))
    if arch == "LlamaForCausalLM":
        config.update(mlp_bias=draw(st.booleans()))
    source_dtype = draw(st.sampled_from(["float32", "bfloat16"]))
    return arch, config, source_dtype


@st.composite
def layouts(draw):
    return dict(
        dtype=draw(st.sampled_from(["auto", "float32", "float16", "bfloat16"])),
        tp_size=draw(st.sampled_from([1, 2, 4, 8])),
        pp_size=draw(st.integers(1, 4)),
        use_parallel_embedding=draw(st.booleans()),
        embedding_sharding_dim=draw(st.sampled_from([0, 1])),
    )


def why_invalid(config: dict, layout: dict) -> list[str]:
    """What the error must mention when TensorRT-LLM's rules cannot lay this model out (empty when they can).

    Computed independently of converter/; when several numbers are wrong, the error may name any of them.
    """
    tp, kv = layout["tp_size"], config["num_key_value_heads"]
    embedding_split = layout["use_parallel_embedding"] and layout["embedding_sharding_dim"] == 1
    reasons = {
        "num_attention_heads": config["num_attention_heads"] % tp != 0,
        "num_key_value_heads": kv % tp != 0 and tp % kv != 0,
        "dimension 0": config["intermediate_size"] % tp != 0,
        "pp_size": layout["pp_size"] > config["num_hidden_layers"],
        "dimension 1": embedding_split and config["hidden_size"] % tp != 0,
    }
    return [reason for reason, broken in reasons.items() if broken]


def checkpoint_dtype(requested: str, source_dtype: str) -> str:
    if requested != "auto":
        return requested
    return "float16" if source_dtype == "float32" else source_dtype


@PROPERTY_SETTINGS
@given(model=models(), layout=layouts(), seed=st.integers(0, 2**16), shards=st.sampled_from([1, 2]))
def test_conversion_matches_trtllm_rules_and_reassembles_exactly(model, layout, seed, shards):
    arch, config, source_dtype = model
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = random_checkpoint(tmp / "hf", arch, seed, dtype=source_dtype, shards=shards, **config)
        reasons = why_invalid(config, layout)
        event("invalid layout" if reasons else "valid layout")
        if reasons:
            with pytest.raises(ShardproofError, match="|".join(reasons)):
                convert(src, tmp / "trt", **layout)
            assert not (tmp / "trt").exists()
            return
        convert(src, tmp / "trt", **layout)
        dtype = getattr(torch, checkpoint_dtype(layout["dtype"], source_dtype))
        source = load_checkpoint(src)
        hf_config = json.loads((src / "config.json").read_text())
        expected = expected_ranks(
            source, hf_config, dtype, layout["tp_size"], layout["pp_size"],
            layout["use_parallel_embedding"], layout["embedding_sharding_dim"],
        )
        for rank, want in enumerate(expected):
            got = load_file(tmp / "trt" / f"rank{rank}.safetensors")
            assert got.keys() == want.keys(), f"rank {rank}: {sorted(got.keys() ^ want.keys())}"
            for name in want:
                assert got[name].dtype == dtype
                assert torch.equal(got[name], want[name]), f"rank {rank}: {name}"

        result = reassemble(tmp / "trt", tmp / "back")
        assert result.ok, result.violations
        back = load_checkpoint(tmp / "back")
        assert back.keys() == source.keys()
        for name, tensor in source.items():  # Gemma's norms: 1 + w rounds in dtype, so w comes back rounded
            want = cast(name, tensor, dtype, arch)
            want = (want.float() - 1.0).to(dtype) if arch == "GemmaForCausalLM" and "norm" in name else want
            assert torch.equal(back[name], want), name


@settings(max_examples=15, deadline=None)
@given(model=models(), seed=st.integers(0, 2**16), data=st.data())
def test_two_layouts_reassemble_to_identical_tensors(model, seed, data):
    arch, config, source_dtype = model
    valid = [
        dict(dtype="bfloat16", tp_size=tp, pp_size=pp)
        for tp in (1, 2, 4, 8)
        for pp in (1, 2, 3)
        if not why_invalid(config, dict(tp_size=tp, pp_size=pp, use_parallel_embedding=False))
    ]
    first, second = data.draw(st.sampled_from(valid)), data.draw(st.sampled_from(valid))
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
