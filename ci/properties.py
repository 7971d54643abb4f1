"""The property check of one family in one target, with a fixed example budget: hypothesis draws configs from the
card's own strategy and layouts valid by construction; each conversion's rank files must hold exactly the planned
tensors, and reassembly must give back every source tensor as the card declares (the cast, and any op's rounding),
bit for bit. A model the target refuses (a condition its card lists in `TargetRows.refused`) is not an
example. Draws are derandomized, so every run checks the same examples."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from shardproof.converter.api import convert
from shardproof.converter.card import get_card
from shardproof.converter.dtypes import safetensors_code
from shardproof.converter.errors import ShardproofError
from shardproof.converter.plan import DEFAULT_TARGET
from shardproof.converter.reassemble import reassemble
from shardproof.converter.safetensors_io import read_header
from shardproof.golden.cases import refused
from shardproof.golden.source_model import write_source_model
from shardproof.verify.tiny_models import tiny_sizes

EXAMPLES = 25
TP_SIZES = (1, 2, 4)


def valid_tp_sizes(architecture: str, overrides: dict[str, Any]) -> list[int]:
    """The tp sizes TensorRT-LLM's rules can split this config over (heads, KV heads, MLP width), worked out from
    the config independently of the converter."""
    sizes = tiny_sizes(architecture, **overrides)
    heads = sizes["num_attention_heads"]
    kv = sizes.get("num_key_value_heads") or heads
    return [tp for tp in TP_SIZES
            if heads % tp == 0 and (kv % tp == 0 or tp % kv == 0) and sizes["intermediate_size"] % tp == 0]


def _round_trip(architecture: str, overrides: dict[str, Any], seed: int, layout: dict[str, Any], target: str) -> None:
    with tempfile.TemporaryDirectory(prefix="shardproof-gate-") as tmp:
        tmp = Path(tmp)
        source = write_source_model(tmp / "hf", architecture, seed, **overrides)
        plan = convert(source, tmp / "trt", **layout, target=target)
        for rank in plan.ranks:
            written = read_header(tmp / "trt" / f"rank{rank.rank}.safetensors")
            planned = {t.name: (safetensors_code(t.torch_dtype), t.shape) for t in rank.tensors}
            assert written == planned, f"rank {rank.rank}: the file's tensors differ from the plan's"
        result = reassemble(tmp / "trt", tmp / "back", target=target)
        assert result.ok, f"reassembly: {result.violations[:3]}"
        original, back = load_file(source / "model.safetensors"), load_file(tmp / "back" / "model.safetensors")
        assert back.keys() == original.keys(), f"reassembled tensors differ: {sorted(back.keys() ^ original.keys())}"
        for name, tensor in original.items():
            assert torch.equal(back[name], plan.reassembled_value(name, tensor)), f"{name} does not round-trip"


def property_failures(architecture: str, examples: int = EXAMPLES, target: str = DEFAULT_TARGET) -> list[str]:
    """Run the property in `target` over `examples` derandomized draws; the falsifying example and error, if any."""
    try:
        from hypothesis import HealthCheck, Phase, assume, given, settings
        from hypothesis import strategies as st
    except ImportError:
        raise ShardproofError("the gate's property check needs hypothesis: pip install 'shardproof[gate]'") from None
    card = get_card(architecture)

    @st.composite
    def cases(draw: Any) -> tuple[dict, int, dict]:
        overrides = draw(card.tests.strategy())
        layers = tiny_sizes(architecture, **overrides)["num_hidden_layers"]
        layout = dict(
            dtype=draw(st.sampled_from(["float32", "float16", "bfloat16"])),
            tp_size=draw(st.sampled_from(valid_tp_sizes(architecture, overrides))),
            pp_size=draw(st.integers(1, min(3, layers))),
            use_parallel_embedding=draw(st.booleans()),
        )
        return overrides, draw(st.integers(0, 2**32 - 1)), layout

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, phases=(Phase.generate,),
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @given(case=cases())
    def converts_and_round_trips(case: tuple[dict, int, dict]) -> None:
        overrides, seed, layout = case
        assume(not refused(card, overrides, target, layout))
        _round_trip(architecture, overrides, seed, layout, target)

    try:
        converts_and_round_trips()
    except Exception as e:  # a failed assertion, or a valid layout refused: both fail the property
        notes = [n for n in getattr(e, "__notes__", []) if n.strip()]
        return [f"{type(e).__name__}: {e}", *notes]
    return []
