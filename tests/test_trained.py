"""A trained model (SmolLM2-135M-Instruct, fetched by bench/fetch_smollm2.py): correct conversions pass, and the
self-test's mutants are caught on it.

Run with `pytest -m trained` once the model is fetched; every test skips when it is not. A trained model is
peakier than the random ones the rest of the suite builds, and deeper (30 layers): what its own forward loses in
a reduced dtype is what a user's checkpoint loses, so a correct conversion reading as wrong shows here first.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardproof.verify.forward import BatchOptions
from shardproof.verify.mutations import CATALOG
from shardproof.verify.selftest import SelftestReport, run_selftest
from shardproof.verify.verification import convert_and_check

pytestmark = pytest.mark.trained

ARCHITECTURE = "LlamaForCausalLM"


@pytest.mark.parametrize("tp_size", [1, 3])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_a_correct_conversion_passes(trained_model, tmp_path, dtype, tp_size):
    result = convert_and_check(trained_model, tmp_path / "checkpoint", dtype=dtype, tp_size=tp_size)
    assert result.passed, result.failures


@pytest.fixture(scope="module")
def selftest(trained_model) -> SelftestReport:
    layers = json.loads((Path(trained_model) / "config.json").read_text())["num_hidden_layers"]
    # its 9 heads split over 3 ranks, not the catalog's 2 or 4; its 30 layers over 2 stages, the second from layer 15
    return run_selftest([m.on_model(3, layers) for m in CATALOG], batch=BatchOptions(num_sequences=1),
                        models={ARCHITECTURE: trained_model})


def test_the_selftest_mutants_are_caught_and_localized(selftest):
    assert len(selftest.mutants) >= 8  # what a Llama with tied embeddings and no biases has to break
    missed = [(o.mutant.name, str(o.setup), o.sharded.failures) for o in selftest.mutants if not o.ok]
    assert not missed


def test_the_selftest_clean_conversions_pass(selftest):
    failed = [(str(o.setup), o.sharded.failures, o.reassembled.failures) for o in selftest.clean if not o.ok]
    assert not failed
