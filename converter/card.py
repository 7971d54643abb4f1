"""The architecture card: everything shardproof knows about one family, registered under its HF name.

A card holds the mapping rows `(target, sources, shard, ops, dtype)`, the source tensors' shapes and the ones
skipped on purpose, the config translation both ways with every HF config field accounted for (read, or
ignored with a reason), which sharded-runtime forward executes it, and what the tests and the self-test need
(a tiny config, a hypothesis strategy). The plan, the reassembler, the verification modes, the property tests
and the self-test iterate over the registry; shared code never names a family.
"""

from __future__ import annotations

import itertools
import re
import string
from pathlib import Path
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Literal, Mapping

from .errors import ShardproofError
from .hf_fields import HFField, read_fields
from .registry import Registry, caller_module
from .transforms import Shard, SourceOp

Shape = tuple[int, ...]
Stage = Literal["first", "layer", "last"]


@dataclass(frozen=True)
class Dims:
    """The numbers and switches that decide every tensor's name and shape; a card subclasses it with its own.

    Integer fields must be positive. A row's condition names boolean fields (`converter.plan.holds`).
    """

    num_layers: int

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ShardproofError(f"model dimension {f.name}={value!r} must be a positive integer")


def placeholders(pattern: str) -> set[str]:
    """The `{name}` indices of a name pattern."""
    return {name for _, name, _, _ in string.Formatter().parse(pattern) if name}


@dataclass(frozen=True)
class Row:
    """One target tensor made from its source tensors: ops first (per source), then the shard.

    `{i}` is the layer (local to the stage in the target, global in the sources). `gather` names indices that
    only the sources hold, each with the dims field that counts it (`(("e", "num_experts"),)`): a source
    pattern holding `{e}` stands for its instances e = 0 .. dims.num_experts - 1, in order, and the shard
    receives all of them. `dtype` pins the stored dtype (e.g. "float32" for a router kept in float32); None
    stores the checkpoint's dtype.
    """

    target: str
    sources: tuple[str, ...]
    shard: Shard
    stage: Stage
    when: str | None = None
    ops: tuple[SourceOp, ...] = ()
    dtype: str | None = None
    gather: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        target = placeholders(self.target)
        gathered = {name for name, _ in self.gather}
        if ("i" in target) != (self.stage == "layer") or any(placeholders(s) - gathered != target for s in self.sources):
            raise ValueError(f"row {self.target}: '{{i}}' must appear in the target and every source of a layer row only")
        if gathered & target or any(all(name not in placeholders(s) for s in self.sources) for name in gathered):
            raise ValueError(f"row {self.target}: a gathered index must appear in a source and not in the target")

    def _expanded(self, dims: Dims | None) -> list[tuple[str, dict[str, int]]]:
        """Every source pattern with the values of the gathered indices it holds, in order."""
        out = []
        for pattern in self.sources:
            held = [(name, count) for name, count in self.gather if name in placeholders(pattern)]
            ranges = [range(getattr(dims, count)) for _, count in held]
            out += [(pattern, dict(zip((name for name, _ in held), values))) for values in itertools.product(*ranges)]
        return out

    def patterns(self, dims: Dims | None = None) -> tuple[str, ...]:
        """The source pattern of each source name `instances` gives, position by position."""
        return tuple(pattern for pattern, _ in self._expanded(dims))

    def instances(self, layers: range, dims: Dims | None = None,
                  global_index: bool = False) -> list[tuple[str, tuple[str, ...]]]:
        """(target, sources) names on a stage holding `layers`; layer targets take the stage-local index (the
        global one with `global_index`). `dims` gives the ranges of gathered indices (needed only when the row
        gathers)."""
        expanded = self._expanded(dims)
        if self.stage != "layer":
            return [(self.target, tuple(p.format(**values) for p, values in expanded))]
        return [
            (self.target.format(i=layer if global_index else local), tuple(p.format(i=layer, **values) for p, values in expanded))
            for local, layer in enumerate(layers)
        ]


def layer(target: str, *sources: str, shard: Shard, **kw: Any) -> Row:
    return Row(f"transformer.layers.{{i}}.{target}", sources, shard, "layer", **kw)


def first(target: str, *sources: str, shard: Shard, **kw: Any) -> Row:
    return Row(target, sources, shard, "first", **kw)


def last(target: str, *sources: str, shard: Shard, **kw: Any) -> Row:
    return Row(target, sources, shard, "last", **kw)


@dataclass(frozen=True)
class Skip:
    """Source tensors deliberately not converted, matched by regular expression, with the reason."""

    pattern: str
    reason: str
    when: str | None = None

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


@dataclass(frozen=True)
class TargetRows:
    """A card's rows for a target other than the TensorRT-LLM checkpoint (`converter/target.py`), or why the card
    cannot be converted to it (`unsupported`). `next_stage` names layer rows (by target pattern) whose tensor a
    pipeline stage that is not the last also holds for the next stage's first layer. `refused`: (row condition,
    reason) pairs; a model or layout for which a condition holds cannot be laid out in the target (the target's
    runtime cannot build it)."""

    rows: tuple[Row, ...] = ()
    next_stage: tuple[str, ...] = ()
    unsupported: str | None = None
    refused: tuple[tuple[str, str], ...] = ()


# A tied model may still store its lm_head copy; the embedding row makes the lm_head, so the copy is skipped.
TIED_LM_HEAD = Skip(r"^lm_head\.weight$", "a tied model's lm_head is the embedding", when="tie_word_embeddings")


# Fields of every HF config.json that never change a model's weights or math, with the reason.
GENERIC_IGNORED: Mapping[str, str] = {
    "architectures": "read by shardproof itself to pick the card",
    "model_type": "read by transformers to pick the config class",
    "transformers_version": "metadata",
    "_name_or_path": "metadata",
    "dtype": "the source dtype; the checkpoint dtype is --dtype",
    "torch_dtype": "the source dtype; the checkpoint dtype is --dtype",
    "bos_token_id": "tokenizer metadata",
    "eos_token_id": "tokenizer metadata",
    "pad_token_id": "tokenizer metadata",
    "use_cache": "generation-time switch",
    "initializer_range": "initialization of untrained weights",
    "attention_dropout": "training only (dropout is off at inference)",
    "output_attentions": "what a forward returns, not what it computes",
    "output_hidden_states": "what a forward returns, not what it computes",
    "return_dict": "what a forward returns, not what it computes",
    "chunk_size_feed_forward": "feed-forward chunking computes the same values",
    "id2label": "labels of classification heads, which a causal LM does not have",
    "label2id": "labels of classification heads, which a causal LM does not have",
    "problem_type": "classification heads only",
    "is_encoder_decoder": "false for every decoder-only family",
}


@dataclass(frozen=True)
class ConfigMap:
    """The config translation both ways, and what the card does with each HF config field.

    `hf_read`: fields whose values the translation uses; `hf_ignored`: fields it deliberately does not use, with
    the reason. A config.json field in neither (nor in GENERIC_IGNORED) is refused: it may change the math.
    `hf_fields`: the card's own reading of the fields it reads (converter/hf_fields.py: types and transformers'
    defaults; `hf_read` is then its names), with `standardize` turning the values into what transformers' config
    class holds (legacy spellings folded in, its validation); None: the translation reads transformers' parse.
    """

    dims_from_hf: Callable[[Any], Dims]
    trt_fields: Callable[[Any, Dims], dict]
    dims_from_trt: Callable[[dict], Dims]
    hf_config: Callable[[dict], dict]
    hf_read: frozenset[str] = frozenset()
    hf_ignored: Mapping[str, str] = field(default_factory=dict)
    hf_fields: Mapping[str, HFField] | None = None
    standardize: Callable[[dict[str, Any]], dict[str, Any]] = dict

    def __post_init__(self) -> None:
        if self.hf_fields is not None:
            if self.hf_read and self.hf_read != set(self.hf_fields):
                raise ValueError("hf_read must name exactly the fields of hf_fields (or be left out)")
            object.__setattr__(self, "hf_read", frozenset(self.hf_fields))

    def view(self, config: Mapping[str, Any], parse: Callable[[], Any], where: Path | str) -> Any:
        """The HF config the translation reads: the card's own reading of `config` (the fields of the config file
        `where`) where it declares `hf_fields`, else transformers' parse (`parse()`); ShardproofError naming `where`
        for a value it refuses."""
        if self.hf_fields is None:
            return parse()
        try:
            return read_fields(self.hf_fields, config, self.standardize)
        except ShardproofError as e:
            raise ShardproofError(f"{where}: {e}") from None

    def ignored(self, config: Mapping[str, Any]) -> dict[str, str]:
        """{field: reason} for the config's fields this card ignores; ShardproofError naming any unknown field."""
        known = {**GENERIC_IGNORED, **self.hf_ignored}
        unknown = sorted(k for k in config if k not in self.hf_read and k not in known)
        if unknown:
            raise ShardproofError(
                f"field(s) {', '.join(unknown)} are not known to this architecture's card and may change the "
                "model's math; shardproof refuses rather than drop them"
            )
        return {k: known[k] for k in config if k in known}


@dataclass(frozen=True)
class TestSupport:
    """What tests and the self-test need to build models of this family from a config (no downloads).

    `config_class`: the transformers config class; `tiny`: overrides of the shared tiny sizes; `selftest`:
    overrides that switch on every optional feature (biases, ...) so every mutant has something to break;
    `strategy()`: a hypothesis strategy of config overrides for the property tests (hypothesis imported
    lazily: it is a test dependency); `norm_center`: the value norms are randomized around (1 when the model
    multiplies by the weight, 0 when it multiplies by 1 + weight); `norms`: a regular expression matching the
    parameter names of those norm weights; `config_names`: how the config class spells the shared tiny sizes
    (`hidden_size`, `num_key_value_heads`, ...) where it differs, None for a size it does not have.
    """

    config_class: str
    strategy: Callable[[], Any]
    tiny: Mapping[str, Any] = field(default_factory=dict)
    selftest: Mapping[str, Any] = field(default_factory=dict)
    norm_center: float = 1.0
    norms: str = "norm"
    config_names: Mapping[str, str | None] = field(default_factory=dict)

    def config_fields(self, sizes: Mapping[str, Any]) -> dict[str, Any]:
        """`sizes` (shared names, as the strategies and tests write them) with the config class's names."""
        out = {}
        for name, value in sizes.items():
            spelled = self.config_names.get(name, name)
            if spelled is not None:
                out[spelled] = value
        return out

    def is_norm(self, parameter: str) -> bool:
        return re.search(self.norms, parameter) is not None


def as_asked(layout: Any, dims: Dims) -> Any:
    """The default layout rule: the layout as the user asked for it."""
    return layout


@dataclass(frozen=True)
class Card:
    """One family: HF architecture name (also TensorRT-LLM's `architecture`), rows, config, runtime, tests.

    `layout(layout, dims)` lets a family force layout rules its TensorRT-LLM config class forces (default:
    the layout as asked). `forward` names the sharded runtime's family forward that executes it.
    `renames` are (checkpoint prefix, transformers prefix) pairs, with `{name}` placeholders, for checkpoints
    whose tensor names differ from transformers' parameter names (saved outside transformers): two-way, so the
    verifiers load such a checkpoint with `from_pretrained(key_mapping=...)` and the tests can write one.
    `targets` holds the card's rows for each further target (`TargetRows`, by target name); `rows` are the
    TensorRT-LLM checkpoint's.
    `golden_dir` is where the card's golden manifests live (a plugin ships them in its package); None: shardproof's
    own `golden/manifests`.
    """

    name: str
    model_type: str
    forward: str
    rows: tuple[Row, ...]
    skips: tuple[Skip, ...]
    source_shapes: Callable[[Dims], dict[str, Shape]]
    config: ConfigMap
    tests: TestSupport
    layout: Callable[[Any, Dims], Any] = as_asked
    renames: tuple[tuple[str, str], ...] = ()
    targets: Mapping[str, TargetRows] = field(default_factory=dict)
    golden_dir: Path | None = None

    def hf_name(self, name: str) -> str:
        """transformers' parameter name for a checkpoint tensor name."""
        for checkpoint, transformers in self.renames:
            name = _rename(name, checkpoint, transformers)
        return name

    def checkpoint_name(self, name: str) -> str:
        """The checkpoint's tensor name for a transformers parameter name."""
        for checkpoint, transformers in self.renames:
            name = _rename(name, transformers, checkpoint)
        return name

    @property
    def hf_key_mapping(self) -> dict[str, str]:
        """`renames` as transformers' `key_mapping` ({regex: replacement})."""
        return {_prefix_regex(c): _replacement(t, c) for c, t in self.renames}


def _names(pattern: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(pattern) if name]


def _prefix_regex(pattern: str) -> str:
    """`model.blocks.{i}.` -> `^model\\.blocks\\.([^.]+)\\.`"""
    parts = string.Formatter().parse(pattern)
    return "^" + "".join(re.escape(text) + ("([^.]+)" if name else "") for text, name, _, _ in parts)


def _replacement(pattern: str, source: str) -> str:
    """`model.layers.{i}.` -> `model.layers.\\1.`, numbering groups as they appear in `source`."""
    groups = {name: index for index, name in enumerate(_names(source), 1)}
    parts = string.Formatter().parse(pattern)
    return "".join(text.replace("\\", "\\\\") + (f"\\{groups[name]}" if name else "") for text, name, _, _ in parts)


def _rename(name: str, source: str, target: str) -> str:
    return re.sub(_prefix_regex(source), _replacement(target, source), name)


CARDS: Registry[Card] = Registry("architecture")


def register(card: Card) -> Card:
    """Register a card under its HF architecture name (at import time, by a built-in card module, a plugin's module
    or any caller); the registering module is recorded as its origin."""
    return CARDS.add(card.name, card, caller_module())


def unregister(name: str) -> None:
    """Remove a card (tests that register a card of their own clean up with this)."""
    CARDS.remove(name)


def get_card(name: str) -> Card:
    """The card registered as `name`, or a ShardproofError listing the supported architectures."""
    card = CARDS.find(name)
    if card is None:
        raise ShardproofError(f"architecture {name!r} is not supported (supported: {', '.join(supported_architectures())})")
    return card


def cards() -> list[Card]:
    """Every registered card, in registration order (built-ins first, then plugins)."""
    return list(CARDS)


def supported_architectures() -> list[str]:
    return sorted(card.name for card in cards())
