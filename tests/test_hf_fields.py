"""Each card's own reading of config.json (converter/hf_fields.py) against transformers' parse of the same fields.

`convert` plans from the card's reading and never imports transformers, so the reading must be transformers'
(defaults, legacy rope spellings, derived sizes included) wherever transformers accepts the config, and must
refuse, with one ShardproofError, every value transformers refuses. Compared: the dims the card derives and the
TensorRT-LLM config fields it writes.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import transformers
from hypothesis import HealthCheck, given, settings, strategies as st

from shardproof.converter.card import Card, cards, get_card
from shardproof.converter.errors import ShardproofError
from shardproof.converter.hf_fields import HFFields
from shardproof.verify.tiny_models import tiny_config, tiny_sizes

READING = [card.name for card in cards() if card.config.hf_fields is not None]
REFUSED = "refused"
ROPE_CARDS = [name for name in READING if "rope_parameters" in get_card(name).config.hf_fields]


def translation(card: Card, hf: Any) -> Any:
    """(dims, TensorRT-LLM fields) the card makes of `hf`, or REFUSED."""
    try:
        dims = card.config.dims_from_hf(hf)
        return dims, card.config.trt_fields(hf, dims)
    except ShardproofError:
        return REFUSED


def card_reading(card: Card, fields: dict) -> Any:
    """The card's own reading's translation; any error but ShardproofError fails the test."""
    try:
        hf = card.config.view(fields, parse=None, where="config.json")
    except ShardproofError:
        return REFUSED
    assert isinstance(hf, HFFields)
    return translation(card, hf)


def transformers_reading(card: Card, fields: dict) -> Any:
    """What the translation made of transformers' parse (the config class's `from_dict`, as `from_pretrained`)."""
    try:
        hf = getattr(transformers, card.tests.config_class).from_dict(json.loads(json.dumps(fields)))
    except Exception:  # transformers refuses with many types
        return REFUSED
    return translation(card, hf)


def header(card: Card) -> dict:
    return {"architectures": [card.name], "model_type": card.model_type}


def tiny_fields(name: str, **overrides: Any) -> dict:
    """A tiny config.json of the card, as its tests build it: the sizes under the config class's names."""
    card = get_card(name)
    return header(card) | card.tests.config_fields(tiny_sizes(name, **overrides))


def saved_fields(name: str, **overrides: Any) -> dict:
    """The tiny config as transformers saves it (`to_json_string`: only what differs from the defaults)."""
    return header(get_card(name)) | json.loads(tiny_config(name, **overrides).to_json_string())


@pytest.mark.parametrize("name", READING)
def test_a_config_that_leaves_every_field_out_reads_as_transformers_defaults(name: str) -> None:
    card = get_card(name)
    want = transformers_reading(card, header(card))
    assert want != REFUSED
    assert card_reading(card, header(card)) == want


@pytest.mark.parametrize("name", READING)
def test_the_tiny_and_selftest_configs_read_alike(name: str) -> None:
    card = get_card(name)
    for fields in (tiny_fields(name), saved_fields(name), tiny_fields(name, **card.tests.selftest),
                   saved_fields(name, **card.tests.selftest)):
        want = transformers_reading(card, fields)
        assert want != REFUSED, fields
        assert card_reading(card, fields) == want, fields


@pytest.mark.parametrize("name", READING)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_cards_model_strategy_reads_alike(name: str, data: st.DataObject) -> None:
    card = get_card(name)
    fields = tiny_fields(name, **data.draw(card.tests.strategy()))
    want = transformers_reading(card, fields)
    assert want != REFUSED, fields
    assert card_reading(card, fields) == want


LEGACY_ROPE = [
    {"rope_theta": 500000},
    {"rope_theta": 250000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
    {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}},
    {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 128}},
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
    {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6, "original_max_position_embeddings": 64},
     "rope_theta": 5.0},
    {"rope_parameters": {"rope_type": "linear", "factor": 2.0}, "rope_scaling": {"rope_type": "dynamic", "factor": 3.0}},
    {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}},  # missing keys transformers requires
    {"rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}},
    {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
     "original_max_position_embeddings": 32},
    {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 7, "long_factor": [2.0] * 8}},
    {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                      "attention_factor": 1.25, "original_max_position_embeddings": 256}},
    {"rope_parameters": {"rope_type": "default", "rope_theta": "10000"}},
    {"rope_parameters": {"rope_type": 3}},
    {"partial_rotary_factor": 0.5},
]


@pytest.mark.parametrize("name, rope", [(name, rope) for name in ROPE_CARDS for rope in LEGACY_ROPE
                                         if set(rope) <= get_card(name).config.hf_read],
                         ids=lambda value: json.dumps(value)[:60] if isinstance(value, dict) else value)
def test_rope_spellings_read_as_transformers_standardizes_them(name: str, rope: dict) -> None:
    card = get_card(name)
    fields = tiny_fields(name, head_dim=16) | rope
    mine, want = card_reading(card, fields), transformers_reading(card, fields)
    assert mine == want or (mine == REFUSED and want != REFUSED and _stricter_ok(rope)), (mine, want)


def _stricter_ok(rope: dict) -> bool:
    """Rope values transformers takes with a warning and that the card refuses: a rope_theta or rope_type that
    is not a number or a string (the translation could not compute rotary_base from them)."""
    params = rope.get("rope_parameters") or rope.get("rope_scaling") or {}
    return not isinstance(params.get("rope_theta", 1.0), (int, float)) or not isinstance(params.get("rope_type", ""), str)


HOSTILE = [None, "7", 7.5, True, False, 0, -3, 10**5, [1], {}, {"rope_type": "linear"}]


@pytest.mark.parametrize("name", READING)
def test_a_hostile_value_the_card_accepts_transformers_accepts_and_reads_alike(name: str) -> None:
    card = get_card(name)
    base = tiny_fields(name)
    accepted = 0
    for field in sorted(card.config.hf_read):
        for value in HOSTILE:
            fields = base | {field: value}
            mine = card_reading(card, fields)
            if mine != REFUSED:
                accepted += 1
                assert mine == transformers_reading(card, fields), (field, value)
    assert accepted  # some values are valid for some field (e.g. a large size, a flag's true)
