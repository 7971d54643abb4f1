"""Fuzzing of the two readers that take untrusted bytes first: the safetensors header and the shard index.

Every input must end in ShardproofError or success: never another exception, a hang or an allocation
beyond the header. Structured safetensors headers must moreover be accepted exactly when the safetensors
library itself (`safetensors.deserialize`) accepts them.

CI runs a few hundred examples per test. For a longer run, raise the count:

    SHARDPROOF_FUZZ_EXAMPLES=20000 python -m pytest -q -p no:cacheprovider tests/test_fuzz_readers.py
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardproof.converter.errors import ShardproofError
from shardproof.converter.paths import within
from shardproof.converter.safetensors_header import DTYPE_BITS, read_safetensors_header
from shardproof.converter.safetensors_index import INDEX, weight_files

FUZZ = settings(
    max_examples=int(os.environ.get("SHARDPROOF_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

junk = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=4),
                 st.integers(-(2**70), 2**70), st.lists(st.integers(-3, 3), max_size=3), st.builds(dict))
dims = st.one_of(st.integers(0, 4), st.integers(-2, 2**65), junk)


@st.composite
def headers(draw) -> tuple[dict, int]:
    """A header that is valid, then damaged by a few random edits, and the data size to put after it."""
    header, offset = {}, 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(sorted(DTYPE_BITS)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = math.prod(shape) * DTYPE_BITS[dtype]
        if size % 8:
            shape, size = [8], 8 * DTYPE_BITS[dtype]
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size // 8]}
        offset += size // 8
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.none(), st.dictionaries(st.text(max_size=3), st.one_of(st.text(max_size=3), junk), max_size=2)))
    for _ in range(draw(st.integers(0, 3))):
        names = [k for k in header if k != "__metadata__"]
        if not names:
            break
        entry = header[draw(st.sampled_from(names))]
        if not isinstance(entry, dict):
            continue
        edit = draw(st.sampled_from(["dtype", "shape", "offset", "drop", "extra", "replace"]))
        if edit == "dtype":
            entry["dtype"] = draw(st.one_of(st.sampled_from(sorted(DTYPE_BITS) + ["F128", "f32", ""]), junk))
        elif edit == "shape":
            entry["shape"] = draw(st.one_of(st.lists(dims, max_size=4), junk))
        elif edit == "offset":
            entry["data_offsets"] = draw(st.one_of(st.lists(dims, min_size=0, max_size=3), junk))
        elif edit == "drop":
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif edit == "extra":
            entry["extra"] = draw(junk)
        else:
            header[draw(st.sampled_from(names))] = draw(junk)
    return header, offset + draw(st.sampled_from([0, 0, 0, 1, 64, -1]))


def _write(path: Path, raw: bytes) -> Path:
    path.write_bytes(raw)
    return path


def _accepted(path: Path) -> bool:
    try:
        read_safetensors_header(path)
        return True
    except ShardproofError:
        return False


@FUZZ
@given(case=headers())
def test_header_reader_judges_as_safetensors_does(case, tmp_path):
    header, data_size = case
    text = json.dumps(header).encode()
    raw = struct.pack("<Q", len(text)) + text + b"\0" * max(data_size, 0)
    ours = _accepted(_write(tmp_path / "f.safetensors", raw))
    try:
        safetensors.deserialize(raw)
        theirs = True
    except Exception:  # safetensors raises its own SafetensorError (and a few others) for a bad file
        theirs = False
    assert ours == theirs, header


@FUZZ
@given(raw=st.one_of(
    st.binary(max_size=64),
    st.tuples(st.integers(0, 2**64 - 1), st.binary(max_size=48)).map(lambda t: struct.pack("<Q", t[0]) + t[1]),
    st.tuples(st.integers(0, 64), st.text(max_size=48)).map(lambda t: struct.pack("<Q", t[0]) + t[1].encode()),
))
def test_header_reader_survives_arbitrary_bytes(raw, tmp_path):
    _accepted(_write(tmp_path / "f.safetensors", raw))  # any exception other than ShardproofError fails


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)
shard_names = st.one_of(
    st.sampled_from(["a.safetensors", "b.safetensors", "link.safetensors", "../outside.safetensors", "/etc/passwd",
                     "", ".", "..", "sub/../a.safetensors", "a.safetensors\0", "x" * 300, "sub", "./a.safetensors"]),
    st.text(max_size=12),
    json_values,
)


@FUZZ
@given(index=st.one_of(
    st.binary(max_size=40),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.text(max_size=8), shard_names, max_size=4).map(lambda m: json.dumps({"weight_map": m}).encode()),
))
def test_index_reader_only_returns_files_inside_the_model_directory(index, tmp_path):
    model = tmp_path / "model"
    if not model.exists():
        (model / "sub").mkdir(parents=True)
        for name in ("a.safetensors", "b.safetensors"):
            (model / name).write_bytes(b"")
        (tmp_path / "outside.safetensors").write_bytes(b"")
        os.symlink(tmp_path / "outside.safetensors", model / "link.safetensors")
    (model / INDEX).write_bytes(index)
    try:
        files = weight_files(model)
    except ShardproofError:
        return
    assert all(within(f, model) for f in files), files
