"""Config carriage: every field of a card's transformers config class is accounted for, and the account is true.

For every registered card (no family is named here):
- every field of its config class (`__init__` parameters and the `to_dict()` keys of a tiny config) is read, ignored
  with a reason, or generically ignored, so a transformers release that adds a field fails here;
- a read field the class does not have is a legacy spelling transformers folds into a class field;
- an ignored field, perturbed, leaves a tiny model's logits bit-identical (same weights, eval mode, fixed tokens),
  unless ALLOWED says why it is safe to ignore anyway;
- a read number or switch, perturbed, changes the converted checkpoint (config.json or tensors) or is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from shardproof.converter.api import convert
from shardproof.converter.card import TestSupport as CardTests
from shardproof.converter.card import GENERIC_IGNORED, Card, cards, get_card, register, unregister
from shardproof.converter.errors import ShardproofError
from shardproof.verify.tiny_models import build_tiny_model, randomize_, tiny_config

ARCHITECTURES = [card.name for card in cards()]
TOKENS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79]])  # below every tiny vocab

# Read fields a config class may lack: older spellings that transformers folds into the class field named, which
# a config.json holding the old spelling does not carry.
LEGACY_SPELLINGS = {
    "rope_theta": "rope_parameters",  # transformers 4's spelling
    "rope_scaling": "rope_parameters",  # transformers 4's spelling
    "partial_rotary_factor": "rope_parameters",  # a top-level spelling (Phi-4-mini's config.json)
}

# Perturbed values for fields whose value has no generic perturbation (switches flip, numbers double or leave 0),
# or where the generic one would not reach the code that reads the field. A callable takes the config.
PERTURBED: dict[str, Any] = {
    "architectures": ["SomeOtherForCausalLM"],
    "model_type": "some_other",
    "transformers_version": "4.0.0",
    "_name_or_path": "elsewhere",
    "dtype": "float16",
    "pad_token_id": 5,
    "bos_token_id": 6,
    "eos_token_id": 7,
    "id2label": {0: "A", 1: "B", 2: "C"},
    "label2id": {"A": 0, "B": 1, "C": 2},
    "problem_type": "regression",
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
    "summary_type": "mean",
    "summary_activation": "tanh",
    "n_ctx": 7,
    "pretraining_tp": 2,
    "attention_bias": True,
    "mlp_bias": True,
    "use_bidirectional_attention": True,
    "rope_theta": 1234.0,
    "partial_rotary_factor": 0.5,
    "sliding_window": 3,  # shorter than TOKENS, so a window that is honoured shows
    "use_sliding_window": True,
    "max_window_layers": 0,
    "layer_types": lambda config: ["sliding_attention"] * config.num_hidden_layers,
}

# Ignored fields whose perturbation may change what a from-config model computes or whether it runs, each with
# why ignoring it is right anyway; their logits are not compared.
ALLOWED = {
    **dict.fromkeys(("sliding_window", "use_sliding_window", "max_window_layers", "layer_types"),
                    "sliding-window attention is the runtime's max_attention_window_size, not checkpoint content; "
                    "verify notes a window shorter than its sequences"),
    "dtype": "the source dtype, which from_config builds in; the checkpoint dtype is --dtype, and verify measures "
             "its cost",
    "return_dict": "what a forward returns (a tuple), not what it computes; transformers 5's causal LMs do not "
                   "run with it off",
}


def class_fields(card: Card) -> set[str]:
    """The config class's own `__init__` parameters and the `to_dict()` keys of the card's tiny config."""
    config_class = getattr(transformers, card.tests.config_class)
    parameters = inspect.signature(config_class.__init__).parameters.values()
    named = {p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return named | set(tiny_config(card.name).to_dict())


def unaccounted(card: Card) -> list[str]:
    """Fields of the card's config class that it neither reads nor ignores (with a reason)."""
    known = card.config.hf_read | {k for k, why in {**GENERIC_IGNORED, **card.config.hf_ignored}.items() if why}
    return sorted(class_fields(card) - known)


def perturbed(name: str, config: Any) -> Any:
    """A different valid value for `name` in `config`; None when there is no known perturbation."""
    if name in PERTURBED:
        value = PERTURBED[name]
        return value(config) if callable(value) else value
    value = getattr(config, name, None)
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return 2 * value if value else (0.25 if isinstance(value, float) else 1)
    return None


def with_field(config: Any, name: str, value: Any) -> Any:
    """A copy of `config` with `name` set as config.json would set it: through the class, so folding happens, and
    without the field a legacy spelling folds into."""
    fields = {k: v for k, v in config.to_dict().items() if k != LEGACY_SPELLINGS.get(name)}
    return type(config)(**{**fields, name: value})


def logits(config: Any, tests: CardTests, weights: dict | None = None) -> tuple[torch.Tensor, dict]:
    """Logits of a from-config model on TOKENS in eval mode, with `weights` (None: random ones as the tiny models
    get them), and its weights."""
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    if weights is None:
        randomize_(model, 0, tests)
    else:
        model.load_state_dict(weights)
    model.eval()
    with torch.no_grad():
        return model(TOKENS).logits, model.state_dict()


def base_overrides(card: Card) -> list[dict]:
    """The card's tiny config as is, and with the self-test's overrides (every optional feature on): a field may
    matter only with a feature on."""
    return [{}, dict(card.tests.selftest)]


def ignored_fields(card: Card) -> list[str]:
    """The ignored fields a config of this card can hold: the class's, and those the card names itself."""
    ignored = (class_fields(card) | set(card.config.hf_ignored)) - card.config.hf_read
    return sorted(ignored & (set(GENERIC_IGNORED) | set(card.config.hf_ignored)))


def math_changes(card: Card) -> list[str]:
    """Each ignored field (outside ALLOWED) whose perturbation changes a tiny model's parameters or logits."""
    changed = []
    for overrides in base_overrides(card):
        config = tiny_config(card.name, **overrides)
        reference, weights = logits(config, card.tests)
        for name in ignored_fields(card):
            value = perturbed(name, config)
            assert value is not None, f"{name}: no perturbation known; add one to PERTURBED"
            if name in ALLOWED:
                continue
            try:
                other, _ = logits(with_field(config, name, value), card.tests, weights)
            except RuntimeError as e:  # load_state_dict: the field changes the parameters
                changed.append(f"{name}={value!r}: {str(e).splitlines()[0]}")
                continue
            if not torch.equal(other, reference):
                changed.append(f"{name}={value!r}: logits differ by {(other - reference).abs().max():.3g}")
    return changed


def converted(directory: Path, architecture: str, overrides: dict) -> tuple[dict, dict] | None:
    """(config.json, {rank file: SHA-256}) of a tiny model converted at tp 1; None when the converter refuses."""
    try:
        model = build_tiny_model(directory / "hf", architecture, seed=0, **overrides)
        convert(model, directory / "ckpt", dtype="float32")
    except ShardproofError:
        return None
    files = sorted((directory / "ckpt").glob("rank*.safetensors"))
    return (json.loads((directory / "ckpt" / "config.json").read_text()),
            {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files})


def read_numbers(card: Card, config: Any) -> dict[str, Any]:
    """The read fields holding a number or a switch (or with a PERTURBED value), each with its perturbed value."""
    return {name: perturbed(name, config) for name in sorted(card.config.hf_read)
            if name in PERTURBED or isinstance(getattr(config, name, None), (bool, int, float))}


def dropped_reads(card: Card, directory: Path) -> dict[str, Any]:
    """{field: perturbed value} for each read number or switch whose perturbation neither changes the converted
    checkpoint nor is refused, under every base config."""
    reaches, dropped = set(), {}
    for index, overrides in enumerate(base_overrides(card)):
        reference = converted(directory / f"base{index}", card.name, overrides)
        assert reference is not None, f"the base config {overrides} is refused"
        for name, value in read_numbers(card, tiny_config(card.name, **overrides)).items():
            if name in reaches:
                continue
            result = converted(directory / f"{index}-{name}", card.name, {**overrides, name: value})
            if result is None or result != reference:
                reaches.add(name)
            else:
                dropped[name] = value
    return {name: value for name, value in dropped.items() if name not in reaches}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_field_of_the_config_class_is_read_or_ignored_with_a_reason(architecture: str) -> None:
    assert not unaccounted(get_card(architecture)), "add each to the card's hf_read, or to hf_ignored with a reason"


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_read_field_the_config_class_lacks_is_a_legacy_spelling(architecture: str) -> None:
    card = get_card(architecture)
    assert sorted(card.config.hf_read - class_fields(card) - set(LEGACY_SPELLINGS)) == [], (
        "a field the config class lacks is a legacy spelling, or transformers does not read it: hf_ignored, with why")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_an_ignored_field_does_not_change_the_math(architecture: str) -> None:
    changed = math_changes(get_card(architecture))
    assert not changed, "ignored but changes the math:\n" + "\n".join(changed)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_read_number_or_switch_reaches_the_checkpoint_or_is_refused(architecture: str, tmp_path: Path) -> None:
    dropped = dropped_reads(get_card(architecture), tmp_path)
    assert not dropped, f"read but dropped (the converted checkpoint is the same): {dropped}"


def test_every_allowed_field_is_ignored_by_some_card() -> None:
    ignored = set().union(*(ignored_fields(card) for card in cards()))
    assert sorted(set(ALLOWED) - ignored) == [], "an allow-list entry no card needs: remove it"


# --- the checks find what they are for ------------------------------------------------------------------------

def _with_account(card: Card, read: set[str], ignored: dict[str, str]) -> Card:
    """`card` with another account of its fields, translated from transformers' parse (its own reading would not
    hold a field the account adds)."""
    config = dataclasses.replace(card.config, hf_read=frozenset(read), hf_ignored=ignored, hf_fields=None)
    return dataclasses.replace(card, config=config)


def test_a_field_missing_from_the_account_is_found() -> None:
    card = cards()[0]
    field = sorted(card.config.hf_read & class_fields(card))[0]
    assert unaccounted(_with_account(card, card.config.hf_read - {field}, card.config.hf_ignored)) == [field]


def test_an_ignored_field_that_changes_the_math_is_found() -> None:
    card = cards()[0]
    field = next(name for name in sorted(card.config.hf_read) if name.endswith("_eps"))  # a norm's epsilon
    account = _with_account(card, card.config.hf_read - {field}, {**card.config.hf_ignored, field: "wrongly"})
    assert [line.split("=")[0] for line in math_changes(account)] == [field, field]


DROPPING = "DropsAFieldForCausalLM"


def test_a_read_field_the_converter_drops_is_found(tmp_path: Path) -> None:
    card = cards()[0]
    register(dataclasses.replace(_with_account(card, card.config.hf_read | {"initializer_range"},
                                               card.config.hf_ignored), name=DROPPING))
    try:
        assert list(dropped_reads(get_card(DROPPING), tmp_path)) == ["initializer_range"]
    finally:
        unregister(DROPPING)
