"""The sharded-mode check and the mutation self-test.

One `shardproof selftest` run (CLI, JSON report) serves the per-mutant assertions; clean conversions of every
supported architecture in several layouts and all three dtypes must pass the sharded mode.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shardproof.converter.api import convert
from shardproof.converter.card import cards, get_card, supported_architectures
from shardproof.converter.target import PYTORCH
from shardproof.cli import app
from shardproof.verify.forward import BatchOptions
from shardproof.verify.mutations import CATALOG, PYTORCH_CATALOG, catalog_for
from shardproof.verify.selftest import run_selftest
from shardproof.verify.serialize import to_json
from shardproof.verify.sharded_check import CONVERSION_REL_ERROR, HFReference, check_sharded, sharded_check
from shardproof.verify.tiny_models import build_tiny_model

# dtype -> layout; every architecture is converted in each (tied embeddings: Gemma by default, Qwen3 here).
LAYOUTS = {
    "float32": dict(tp_size=2, pp_size=2, use_parallel_embedding=True),
    "float16": dict(tp_size=4, pp_size=1),
    "bfloat16": dict(tp_size=1, pp_size=3),
}
OVERRIDES = {"Qwen3ForCausalLM": dict(tie_word_embeddings=True, head_dim=32),
             # every expert on every token: low-precision math flips a tiny random router's near-ties (docs/format.md)
             "MixtralForCausalLM": dict(num_experts_per_tok=4)}


def _no_nan(text: str) -> dict:
    def reject(constant: str) -> None:
        raise ValueError(f"the report holds {constant}, which is not JSON")

    return json.loads(text, parse_constant=reject)


@pytest.fixture(scope="module")
def selftest_run(tmp_path_factory) -> tuple[int, str, dict]:
    """`shardproof selftest --device cpu --report ...`: exit code, output and the parsed JSON report."""
    path = tmp_path_factory.mktemp("selftest") / "report.json"
    result = CliRunner().invoke(app, ["selftest", "--device", "cpu", "--report", str(path)])
    assert path.is_file(), result.output
    return result.exit_code, result.output, _no_nan(path.read_text())


def test_cli_selftest_exits_0_on_the_clean_tree(selftest_run) -> None:
    exit_code, output, report = selftest_run
    failing = [o for o in report["clean"] + report["mutants"] if not o["ok"]]
    assert exit_code == 0 and report["passed"], [(o["mutant"], o["setup"], o["sharded"]["failures"],
                                                  o["reassembled"]["failures"]) for o in failing]
    assert "fault x mode" in output and "conversion check (worst stage's relative error) threshold" in output
    ran = [(o["mutant"], o["setup"].split()[0]) for o in report["mutants"]]
    skipped = [(m["mutant"], m["setup"].split()[0]) for m in report["not_applicable"]]
    assert sorted(ran + skipped) == sorted((m.name, a) for m in CATALOG for a in supported_architectures())
    assert {o["setup"].split()[0] for o in report["clean"]} == set(supported_architectures())


def _stage_error(sharded: dict, stage: str) -> float:
    value = dict((s["stage"], s["relative_error"]) for s in sharded["localization"]["stages"])[stage]
    return float(value)  # "nan" and "inf" are strings in the JSON report


@pytest.mark.parametrize("mutant", CATALOG, ids=[m.name for m in CATALOG])
def test_each_mutant_is_caught_by_the_sharded_mode_on_every_card_it_applies_to(selftest_run, mutant) -> None:
    _, _, report = selftest_run
    outcomes = [o for o in report["mutants"] if o["mutant"] == mutant.name]
    assert outcomes, f"{mutant.name} applies to no registered card"
    for outcome in outcomes:
        sharded = outcome["sharded"]
        assert not sharded["passed"], outcome["setup"]
        assert sharded["located"] == mutant.diverges_at, (outcome["setup"], sharded["localization"])
        if mutant.diverges_at == "structure":
            assert "mlp.fc.weight" in sharded["structural"] and "has shape" in sharded["structural"]
        else:  # the stage it names is where the error first exceeds the threshold (or stops being finite)
            error = _stage_error(sharded, mutant.diverges_at)
            assert not error <= CONVERSION_REL_ERROR, (outcome["setup"], error)


def test_subtle_low_precision_faults_are_caught_by_the_conversion_comparison(selftest_run) -> None:
    """Faults smaller than a fixed precision limit (the old one missed them all): the float32 comparison over the
    stored values catches every one with room to spare, whatever the cost comparison (against the model's own
    cost of the dtype) also sees."""
    _, _, report = selftest_run
    for name in ("bf16-detour", "norm-shift-after-cast"):
        outcomes = [o["sharded"] for o in report["mutants"] if o["mutant"] == name]
        assert outcomes, name
        for sharded in outcomes:
            conversion = next(c for c in sharded["comparisons"] if c["name"] == "conversion")
            assert conversion["checks"]["stage_relative_error"]["value"] > 10 * CONVERSION_REL_ERROR


def test_no_mutant_is_caught_by_the_cost_check_alone(selftest_run) -> None:
    """COST_FACTOR is calibrated on clean runs alone (verify/dtype_cost.py): every mutant fails the float32
    conversion check or is structural, so the factor moves no mutant."""
    _, _, report = selftest_run
    for outcome in report["mutants"]:
        sharded = outcome["sharded"]
        failed = {c["check"] for c in sharded["checks"] if c["status"] == "failed"}
        assert sharded["structural"] or "conversion" in failed, (outcome["mutant"], outcome["setup"], failed)


def test_fp16_overflow_is_blamed_on_the_cast_and_located(selftest_run) -> None:
    _, _, report = selftest_run
    outcomes = [o["sharded"] for o in report["mutants"] if o["mutant"] == "fp16-overflow"]
    assert len(outcomes) == len(supported_architectures())
    for sharded in outcomes:
        assert any("reference_nonfinite" in f for f in sharded["failures"])
        assert sharded["localization"]["comparison"] == "precision"
        assert sharded["located"] == "layer 1"


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, HFReference]:
    tmp = tmp_path_factory.mktemp("clean")
    return {
        arch: HFReference(build_tiny_model(tmp / arch, arch, seed=5, **OVERRIDES.get(arch, {})),
                          BatchOptions("cpu", num_sequences=1, seq_len=256, seed=1))
        for arch in supported_architectures()
    }


@pytest.mark.parametrize("dtype", list(LAYOUTS))
@pytest.mark.parametrize("architecture", supported_architectures())
def test_clean_conversions_pass_the_sharded_mode(references, tmp_path: Path, architecture: str, dtype: str) -> None:
    reference = references[architecture]
    convert(reference.model_dir, tmp_path / "ckpt", dtype=dtype, **LAYOUTS[dtype])
    report = check_sharded(tmp_path / "ckpt", reference)
    assert report.passed, report.failures
    assert report.localization is None
    expected = ["conversion"] if dtype == "float32" else ["conversion", "precision"]
    assert [c.name for c in report.comparisons] == expected
    assert report.comparison("conversion").checks["stage_relative_error"].value < CONVERSION_REL_ERROR / 10
    _no_nan(json.dumps(to_json(report)))


def test_a_checkpoint_of_another_model_fails_at_the_embedding(tmp_path: Path) -> None:
    source = build_tiny_model(tmp_path / "source", "LlamaForCausalLM", seed=5)
    other = build_tiny_model(tmp_path / "other", "LlamaForCausalLM", seed=6)
    convert(other, tmp_path / "ckpt", dtype="float32", tp_size=2)
    report = sharded_check(source, tmp_path / "ckpt", BatchOptions("cpu", num_sequences=1, seq_len=64))
    assert not report.passed
    assert report.localization.first_diverging == "embedding"


def test_a_mutant_with_nothing_to_break_is_listed_not_run() -> None:
    """A card with no op that rounds has no `1 + weight` to get wrong: the mutant is not applicable there."""
    (op_mutant,) = [m for m in CATALOG if m.name == "norm-not-shifted"]
    plain = next(c.name for c in cards() if not any(row.ops for row in c.rows))
    report = run_selftest([op_mutant], architectures=[plain], batch=BatchOptions("cpu", num_sequences=1))
    assert report.mutants == [] and len(report.clean) == 1 and report.clean[0].ok
    assert [(m.name, str(s), r) for m, s, r in report.not_applicable] == [
        (op_mutant.name, f"{plain} bfloat16 tp2 pp1", f"{plain} has no op that rounds to get wrong")]


def test_selftest_of_an_unknown_architecture_is_bad_input() -> None:
    result = CliRunner().invoke(app, ["selftest", "--architecture", "NoSuchForCausalLM"])
    assert result.exit_code == 2 and "NoSuchForCausalLM" in result.output


@pytest.fixture(scope="module")
def pytorch_selftest_run(tmp_path_factory) -> tuple[int, dict]:
    """`shardproof selftest --target trtllm-pytorch`: exit code and the parsed JSON report."""
    path = tmp_path_factory.mktemp("selftest-pytorch") / "report.json"
    result = CliRunner().invoke(app, ["selftest", "--device", "cpu", "--target", PYTORCH.name, "--report", str(path)])
    assert path.is_file(), result.output
    return result.exit_code, _no_nan(path.read_text())


def test_selftest_in_the_pytorch_target_catches_every_mutant_that_applies_to_it(pytorch_selftest_run) -> None:
    """Every card the target supports, every mutant of either catalog that applies to its rank files (its own and
    the source faults): the clean conversions pass, each mutant is caught where it declares."""
    exit_code, report = pytorch_selftest_run
    failing = [(o["mutant"], o["setup"]) for o in report["clean"] + report["mutants"] if not o["ok"]]
    assert exit_code == 0 and report["passed"], failing
    supported = [a for a in supported_architectures() if PYTORCH.supports(get_card(a))]
    assert {o["setup"].split()[0] for o in report["clean"]} == set(supported)
    assert all(o["setup"].endswith(PYTORCH.name) for o in report["clean"] + report["mutants"])
    ran = [(o["mutant"], o["setup"].split()[0]) for o in report["mutants"]]
    skipped = [(m["mutant"], m["setup"].split()[0]) for m in report["not_applicable"]]
    assert sorted(ran + skipped) == sorted((m.name, a) for m in catalog_for(PYTORCH.name) for a in supported)
    assert {m.name for m in PYTORCH_CATALOG} <= {name for name, _ in ran}
    for outcome in report["mutants"]:
        assert not outcome["sharded"]["passed"] and outcome["sharded"]["located"] == outcome["sharded"]["expected_location"]


def test_selftest_of_a_card_the_target_does_not_support_is_bad_input() -> None:
    unsupported = next(c.name for c in cards() if not PYTORCH.supports(c))
    result = CliRunner().invoke(app, ["selftest", "--target", PYTORCH.name, "--architecture", unsupported])
    assert result.exit_code == 2 and "not supported" in result.output


def test_a_mutant_moves_to_a_model_the_catalog_layouts_do_not_fit() -> None:
    """`on_model`: split layouts take the model's tp, tp 1 stays; a stage-boundary fault is expected at the first
    layer of the second stage (the first stages take the extra layers)."""
    by_name = {m.name: m for m in CATALOG}
    early = by_name["stages-one-layer-early"].on_model(3, 31)
    assert (early.layout.tp_size, early.layout.pp_size, early.diverges_at) == (3, 2, "layer 16")
    swapped = by_name["gate-up-swapped"].on_model(3, 31)
    assert (swapped.layout.tp_size, swapped.diverges_at) == (1, "layer 0")
    assert by_name["qkv-order-kqv"].on_model(3, 31).layout.tp_size == 3
