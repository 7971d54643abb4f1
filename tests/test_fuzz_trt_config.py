"""Fuzzing of the TensorRT-LLM config.json reader (`converter/checkpoint.py: TRTCheckpoint`) through `shardproof inspect`.

A valid checkpoint's config.json gets random JSON values in its fields (null, strings, lists, nested objects,
huge and negative integers, floats for integers, other architectures' names, fields deleted). Every input must
end in exit 0, 1 or 2 (2 with exactly one line): never a traceback, a hang (each example runs under a 20 s
alarm) or a plan of absurd size (`num_hidden_layers: 10**12` is refused before planning).

CI runs a few hundred examples. For a longer run, raise the count:

    SHARDPROOF_FUZZ_EXAMPLES=20000 python -m pytest -q -p no:cacheprovider tests/test_fuzz_trt_config.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from shardproof.cli import app
from shardproof.converter.api import convert
from shardproof.converter.card import supported_architectures
from shardproof.converter.manifest import MANIFEST
from tests.helpers import random_checkpoint
from tests.hostile_cases import SMALL

FUZZ = settings(
    max_examples=int(os.environ.get("SHARDPROOF_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
HANG_S = 20

scalars = st.one_of(
    st.none(), st.booleans(), st.text(max_size=6), st.floats(), st.integers(-3, 8),
    st.sampled_from([0, -1, 2**31, 2**63, 10**12, 10**30, 2.0, 0.5, 1e308, "2", "float16", "bfloat16", "LlamaForCausalLM"]),
    st.integers(),
)
huge = st.one_of(st.sampled_from([0, -1, 2.0, "2", True, 10**5, 10**6, 10**12, 2**63, 10**400]), st.integers(-(2**70), 2**70),
                 st.integers(0, 2**20))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=6)



@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, dict]:
    """A tp=2 checkpoint without its manifest (which would name the edited config.json first), and its config."""
    tmp = tmp_path_factory.mktemp("trt")
    model = random_checkpoint(tmp / "hf", "LlamaForCausalLM", seed=0, **SMALL)
    convert(model, tmp / "ckpt", tp_size=2)
    (tmp / "ckpt" / MANIFEST).unlink()
    return tmp / "ckpt", json.loads((tmp / "ckpt" / "config.json").read_text())


@st.composite
def configs(draw, config: dict) -> dict:
    """`config` after a few random edits: a field (top level, mapping, rotary_scaling) set, deleted or replaced."""
    config = json.loads(json.dumps(config))
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(["top", "top", "mapping", "rotary_scaling"]))
        target = config if section == "top" else config.get(section)
        if section != "top" and not isinstance(target, dict):
            target = config[section] = {}
        key = draw(st.one_of(st.sampled_from(sorted(target) or ["type"]), st.sampled_from(["type", "factor", "tp_size"])))
        edit = draw(st.sampled_from(["value", "size", "size", "delete", "architecture"]))
        if edit == "size":  # a count or a size of the model or the mapping: huge, zero, negative, a float, a string
            where = draw(st.sampled_from([config, config["mapping"]])) if isinstance(config.get("mapping"), dict) else config
            sizes = sorted(k for k, v in where.items() if type(v) is int)
            sizes += ["num_hidden_layers"] * len(sizes) if where is config else []  # it multiplies the plan: weighted
            where[draw(st.sampled_from(sizes or ["num_hidden_layers"]))] = draw(huge)
        elif edit == "delete":
            target.pop(key, None)
        elif edit == "architecture":
            config["architecture"] = draw(st.sampled_from(supported_architectures()))
        else:
            target[key] = draw(json_values)
    return config


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"no answer within {HANG_S} s")


@FUZZ
@given(data=st.data())
def test_inspect_answers_every_config_in_one_line(base, tmp_path_factory, data):
    clean, config = base
    edited = data.draw(configs(config))
    ckpt = tmp_path_factory.mktemp("fuzz") / "ckpt"
    shutil.copytree(clean, ckpt)
    (ckpt / "config.json").write_text(json.dumps(edited))
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_S)
    try:
        result = CliRunner().invoke(app, ["inspect", str(ckpt)])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        shutil.rmtree(ckpt.parent)
    assert result.exception is None or isinstance(result.exception, SystemExit), (edited, repr(result.exception))
    assert result.exit_code in (0, 1, 2), result.output
    if result.exit_code == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and "config.json" in lines[0], (edited, result.stderr)


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "intermediate_size"])
def test_a_size_past_floats_range_is_answered_not_raised(base, tmp_path, field):
    """Found by the fuzzer: a vocabulary of 10**400 overflowed a float division while planning the padded rows
    (`ceil_div` is integer-exact); the checkpoint is then simply not what its config says."""
    clean, config = base
    ckpt = tmp_path / "ckpt"
    shutil.copytree(clean, ckpt)
    (ckpt / "config.json").write_text(json.dumps({**config, field: 10**400}))
    result = CliRunner().invoke(app, ["inspect", str(ckpt)])
    assert isinstance(result.exception, SystemExit) and result.exit_code in (1, 2), repr(result.exception)
