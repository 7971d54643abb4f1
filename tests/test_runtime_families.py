"""The runtime's families: every architecture card's forward has one, and family knowledge stays in them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import shardproof.verify.runtime as runtime
from shardproof.converter.card import CARDS
from shardproof.converter.errors import CheckNotRun
from shardproof.verify.runtime.blocks import ROTARY_SCALING_TYPES
from shardproof.verify.runtime.family import get_family

FAMILY_NAMES = re.compile("gemma|qwen|mistral|llama|phi|gpt2|mixtral", re.IGNORECASE)
RUNTIME = Path(runtime.__file__).parent


@pytest.mark.parametrize("entry", CARDS.entries(), ids=lambda entry: entry.name)
def test_every_card_forward_has_a_family_module(entry) -> None:
    """A built-in card's forward is `families/<forward>.py`; a plugin's card brings its own, registered."""
    forward = entry.item.forward
    family = get_family(forward)
    assert family.name == forward
    if entry.origin == "built-in":
        assert (RUNTIME / "families" / f"{forward}.py").is_file()


def test_unknown_forward_is_not_run() -> None:
    with pytest.raises(CheckNotRun, match="no family forward 'no-such-forward'"):
        get_family("no-such-forward")


def test_no_family_names_outside_the_family_modules() -> None:
    """Only families/ may name a family; a rotary scaling type is matched as the quoted config value."""
    modules = [p for p in RUNTIME.rglob("*.py") if "families" not in p.relative_to(RUNTIME).parts]
    assert len(modules) > 5
    found = []
    for path in modules:
        text = path.read_text()
        for kind in ROTARY_SCALING_TYPES:
            text = text.replace(f'"{kind}"', '""')
        found += [f"{path.relative_to(RUNTIME)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group()}"
                  for m in FAMILY_NAMES.finditer(text)]
    assert not found, found
