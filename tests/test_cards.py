"""The architecture card as the unit of extension.

- Shared code names no family: only the cards and the sharded runtime's family modules do.
- A card registered from outside the project (here, from this test) converts, reassembles and passes both
  verify modes and the self-test, with no project file touched.
- Every config field of a card's tiny model is read or ignored with a reason; an unknown field is refused.
- Gemma at tp 2 gets the layout TensorRT-LLM's GemmaConfig forces (and can load).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from shardproof.cli import app
from shardproof.converter.api import convert
from shardproof.converter.card import GENERIC_IGNORED, cards, get_card, register, unregister
from shardproof.converter.reassemble import reassemble
from shardproof.verify.forward import BatchOptions
from shardproof.verify.outcomes import Status
from shardproof.verify.selftest import run_selftest
from shardproof.verify.tiny_models import build_tiny_model
from shardproof.verify.verification import verify_checkpoint
from tests.helpers import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHARED_CODE = ["converter", "verify", "src", "golden", "ci"]
FAMILY_CODE = [ROOT / "converter" / "cards", ROOT / "verify" / "runtime" / "families"]
FAMILY = re.compile(r"gemma|qwen|mistral|\bphi|gpt-?2|mixtral|llama(?!3\")", re.IGNORECASE)


def test_shared_code_names_no_family() -> None:
    found = []
    for folder in SHARED_CODE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if any(path.is_relative_to(family) for family in FAMILY_CODE):
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if FAMILY.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


# --- a card registered from the test suite alone --------------------------------------------------------------

VARIANT = "RenamedAttentionForCausalLM"
RENAMES = (("model.blocks.{i}.attn.", "model.layers.{i}.self_attn."),)


def _renamed(name: str) -> str:
    return name.replace("model.layers.{i}.self_attn.", "model.blocks.{i}.attn.")


@pytest.fixture(scope="module")
def variant():
    """The first built-in card with its attention tensors stored under other names, registered as VARIANT."""
    base = cards()[0]
    card = dataclasses.replace(
        base,
        name=VARIANT,
        rows=tuple(dataclasses.replace(row, sources=tuple(_renamed(s) for s in row.sources)) for row in base.rows),
        source_shapes=lambda dims: {_renamed(k): v for k, v in base.source_shapes(dims).items()},
        renames=RENAMES,
    )
    register(card)
    yield card
    unregister(VARIANT)


def test_a_variant_card_converts_reassembles_and_verifies(variant, tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "hf", VARIANT, seed=2)
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "model.blocks.0.attn.q_proj.weight" in names and not any(".self_attn." in n for n in names)
    convert(model, tmp_path / "ckpt", dtype="bfloat16", tp_size=2, pp_size=2)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["architecture"] == VARIANT

    result = reassemble(tmp_path / "ckpt", tmp_path / "back")
    assert result.ok, result.violations
    source, back = load_checkpoint(model), load_checkpoint(tmp_path / "back")
    assert back.keys() == source.keys()
    assert all(torch.equal(back[name], tensor.bfloat16()) for name, tensor in source.items())

    verification = verify_checkpoint(model, tmp_path / "ckpt", "both", BatchOptions("cpu", num_sequences=1, seq_len=64))
    assert verification.passed, verification.failures
    assert verification.checks and all(c.status is Status.PASSED for c in verification.checks)


def test_the_self_test_runs_on_a_variant_card(variant) -> None:
    report = run_selftest(architectures=[VARIANT], batch=BatchOptions("cpu", num_sequences=1, seq_len=128))
    assert report.passed, [(o.mutant.name if o.mutant else "clean", str(o.setup)) for o in report.mutants + report.clean if not o.ok]
    assert len(report.mutants) >= 10 and all(str(o.setup).startswith(VARIANT) for o in report.mutants)


# --- config fields -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("architecture", [card.name for card in cards()])
def test_every_config_field_of_a_tiny_model_is_accounted_for(architecture: str, tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "hf", architecture, seed=0)
    config = json.loads((model / "config.json").read_text())
    card = get_card(architecture)
    ignored = card.config.ignored(config)  # raises on an unknown field
    assert set(config) <= card.config.hf_read | set(ignored)
    assert all(reason for reason in ignored.values())
    assert not card.config.hf_read & set(GENERIC_IGNORED)


def test_an_unknown_config_field_is_refused_naming_it(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "hf", cards()[0].name, seed=0)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "attention_logit_cap": 30.0}))
    result = CliRunner().invoke(app, ["convert", "--model_dir", str(model), "--output_dir", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "attention_logit_cap" in result.output and "config.json" in result.output
    assert not (tmp_path / "o").exists()


# --- a card's layout rule ------------------------------------------------------------------------------------

def test_gemma_at_tp2_shares_a_vocab_parallel_embedding_and_stores_no_lm_head(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "hf", "GemmaForCausalLM", seed=0, vocab_size=100)
    convert(model, tmp_path / "ckpt", dtype="float32", tp_size=2)  # no --use_parallel_embedding
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["use_parallel_embedding"] is True and config["embedding_sharding_dim"] == 0
    assert config["share_embedding_table"] is True
    embedding = load_checkpoint(model)["model.embed_tokens.weight"]
    for rank in range(2):
        with safe_open(str(tmp_path / "ckpt" / f"rank{rank}.safetensors"), framework="pt") as f:
            assert "lm_head.weight" not in f.keys()
            shard = f.get_tensor("transformer.vocab_embedding.weight")
        assert torch.equal(shard, embedding[50 * rank : 50 * (rank + 1)])
    assert reassemble(tmp_path / "ckpt", tmp_path / "back").ok
    verification = verify_checkpoint(model, tmp_path / "ckpt", "both", BatchOptions("cpu", num_sequences=1, seq_len=64))
    assert verification.passed, verification.failures
