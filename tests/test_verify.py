"""The equivalence check says yes only when the checkpoint is the model.

Correct conversions pass for every dtype and several tp/pp layouts; each tampering of a rank file (or of the
checkpoint's config) fails with exit code 1 and the report names the rank and tensor, or the first diverging
module. Exit codes are checked through the CLI, report contents through the Python API.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from shardproof.converter.api import convert
from shardproof.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, app
from shardproof.verify.equivalence import EquivalenceReport, verify_equivalence
from shardproof.verify.forward import BatchOptions
from shardproof.verify.metrics import bit_identical, first_difference, logit_metrics
from shardproof.verify.serialize import to_json
from shardproof.verify.tiny_models import build_tiny_model
from tests.helpers import restamp_manifest

FAST = BatchOptions(device="cpu", num_sequences=2, seq_len=32)
FAST_ARGS = ["--device", "cpu", "--num-sequences", "2", "--seq-len", "32"]
runner = CliRunner()


# --- helpers ------------------------------------------------------------------------------------------------

def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def rewrite_rank(checkpoint: Path, rank: int, edit) -> None:
    """Load rank{rank}.safetensors, let `edit(tensors)` change the dict in place, save it back, and restamp the
    manifest as the faulty converter would have (the manifest's own check is tests/test_manifest.py's)."""
    path = checkpoint / f"rank{rank}.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    restamp_manifest(checkpoint)


def rewrite_source(model: Path, edit) -> None:
    path = model / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def converted(model: Path, out: Path, **layout) -> Path:
    convert(model, out, **layout)
    return out


def verify_both(model: Path, checkpoint: Path, tmp_path: Path) -> tuple[int, EquivalenceReport, dict]:
    """Run the check through the CLI (exit code, JSON report of the reassembled mode) and through the API.

    The CLI runs both modes; a failing exit code must agree with what each mode's JSON says.
    """
    report_file = tmp_path / "report.json"
    result = invoke("verify", "--model_dir", model, "--checkpoint-dir", checkpoint, *FAST_ARGS, "--report", report_file)
    saved = json.loads(report_file.read_text())
    assert saved["mode"] == "both"
    assert saved["passed"] == (saved["reassembled"]["passed"] and saved["sharded"]["passed"]) == (result.exit_code == EXIT_OK)
    return result.exit_code, verify_equivalence(model, checkpoint, FAST), saved["reassembled"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """hidden 64, 3 layers, 4 heads, 2 KV heads, vocab 97 (odd: lm_head is padded for any even tp)."""
    return build_tiny_model(tmp_path_factory.mktemp("llama"), "LlamaForCausalLM", seed=1)


@pytest.fixture(scope="module")
def llama_kv4(tmp_path_factory) -> Path:
    """8 heads, 4 KV heads of dim 8: over tp=2 every rank holds 2 KV heads."""
    return build_tiny_model(
        tmp_path_factory.mktemp("kv4"), "LlamaForCausalLM", seed=2,
        num_attention_heads=8, num_key_value_heads=4, head_dim=8, num_hidden_layers=2,
    )


# --- metrics ------------------------------------------------------------------------------------------------

def test_bit_identity_is_about_bits():
    a = torch.tensor([0.0, float("nan"), 1.0])
    assert bit_identical(a, a.clone())
    assert not bit_identical(a, torch.tensor([-0.0, float("nan"), 1.0]))
    assert not bit_identical(a, a.half())
    assert first_difference(a, torch.tensor([0.0, float("nan"), 2.0])) == (2,)
    assert first_difference(torch.zeros(3, 4), torch.zeros(3, 4).index_put_((torch.tensor(2), torch.tensor(1)), torch.tensor(1.0))) == (2, 1)


def test_logit_metrics():
    logits = torch.randn(2, 16, 50, generator=torch.Generator().manual_seed(0))
    same = logit_metrics(logits, logits.clone())
    assert same.max_abs_diff == 0 and same.kl_mean == 0 and same.top1_agreement == 1 and same.nonfinite == 0
    assert same.cosine_min == pytest.approx(1.0)
    shifted = logit_metrics(logits, logits + 3.0)  # softmax is shift-invariant
    assert shifted.kl_mean == pytest.approx(0, abs=1e-12) and shifted.top1_agreement == 1
    overflowed = logits.clone()
    overflowed[1, 3, 7] = float("inf")
    bad = logit_metrics(logits, overflowed)
    assert bad.nonfinite == 1 and math.isnan(bad.kl_mean) and math.isnan(bad.cosine_min)
    assert to_json(bad)["kl_mean"] == "nan"


# --- correct conversions pass -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "architecture, overrides, layout",
    [
        ("LlamaForCausalLM", {}, dict(dtype="float32")),
        ("LlamaForCausalLM", {}, dict(dtype="float16", tp_size=2, pp_size=2)),
        ("LlamaForCausalLM", {}, dict(dtype="bfloat16", tp_size=4)),
        ("LlamaForCausalLM", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
         dict(dtype="float16", tp_size=2, use_parallel_embedding=True)),
        ("MistralForCausalLM", {}, dict(dtype="bfloat16", pp_size=3, tp_size=2, use_parallel_embedding=True, embedding_sharding_dim=1)),
        ("Qwen2ForCausalLM", {}, dict(dtype="bfloat16", tp_size=2)),
        ("Qwen3ForCausalLM", dict(head_dim=24), dict(dtype="float16", tp_size=2, pp_size=2)),
        ("GemmaForCausalLM", {}, dict(dtype="bfloat16", tp_size=2, pp_size=2)),
    ],
    ids=["llama-fp32", "llama-fp16-tp2pp2", "llama-bf16-tp4", "llama-tied-bias-fp16-pe", "mistral-bf16-tp2pp3-pe1",
         "qwen2-bf16-tp2", "qwen3-fp16-tp2pp2", "gemma-bf16-tp2pp2"],
)
def test_correct_conversion_passes(tmp_path, architecture, overrides, layout):
    model = build_tiny_model(tmp_path / "model", architecture, seed=3, **overrides)
    report = verify_equivalence(model, converted(model, tmp_path / "ckpt", **layout), FAST)
    assert report.passed, report.failures
    assert not report.violations and not report.config_differences and report.localization is None
    assert report.weights.ok and len(report.weights.tensors) > 0 and not report.weights.ranks
    assert report.forward.identical and report.forward.metrics is None  # sized only when they differ
    assert report.precision.ok and set(report.precision.checks) == {"nonfinite"}  # the cost is reported, not judged
    if architecture == "MistralForCausalLM":
        assert "sliding window of 4096 tokens" in report.notes[0]
    if architecture == "GemmaForCausalLM":  # norms are stored as 1 + weight, which rounds in bfloat16
        assert "7 source tensor(s) go through an op that rounds" in report.notes[0]
    if overrides.get("tie_word_embeddings"):
        assert report.weights.skipped == {}  # a tied source has no lm_head.weight to skip
    assert set(report.timings) == {"reassemble", "forward", "precision"}  # the weights compared in the forward's lock step


def test_check_command_converts_and_verifies(tmp_path, llama):
    out, report_file = tmp_path / "ckpt", tmp_path / "r.json"
    result = invoke(
        "check", "--model-dir", llama, "--output_dir", out, "--dtype", "bfloat16", "--tp_size", "2", "--pp-size", "2",
        *FAST_ARGS, "--report", report_file,
    )
    assert result.exit_code == EXIT_OK, result.output
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == [f"rank{i}.safetensors" for i in range(4)]
    report = json.loads(report_file.read_text())
    assert report["passed"] and report["mode"] == "both" and report["sharded"]["passed"]
    reassembled = report["reassembled"]
    assert reassembled["tp_size"] == 2 and reassembled["pp_size"] == 2 and reassembled["dtype"] == "bfloat16"
    assert list(report["timings_s"]) == ["convert", "manifest", "reassemble", "forward", "precision", "sharded"]
    assert "PASS" in result.stdout


def test_demo_checks_long_sequences():
    """The demo: a GQA Llama over tp=4 pp=2 (replicated KV heads, padded vocab), 256-token sequences."""
    result = invoke("check", "--demo", "--device", "cpu", "--num-sequences", "2")
    assert result.exit_code == EXIT_OK, result.output
    text = " ".join(result.stdout.split())  # rich wraps lines at 80 columns off a terminal
    assert "each KV head is replicated on 2 ranks" in text and "padded from 1001 to 1004" in text
    assert "2 x 256 tokens" in text and "PASS" in text


# --- tampered checkpoints fail, naming what is wrong ---------------------------------------------------------

def swap_fc_and_gate(tensors) -> None:
    """The gate/up swap a converter makes when it maps HF up_proj to `mlp.fc` (layer 1)."""
    fc, gate = "transformer.layers.1.mlp.fc.weight", "transformer.layers.1.mlp.gate.weight"
    tensors[fc], tensors[gate] = tensors[gate], tensors[fc]


def test_gate_and_up_swapped(tmp_path, llama):
    ckpt = converted(llama, tmp_path / "ckpt", dtype="float16", tp_size=2)
    for rank in range(2):
        rewrite_rank(ckpt, rank, swap_fc_and_gate)
    code, report, saved = verify_both(llama, ckpt, tmp_path)
    assert code == EXIT_FAILED and not saved["passed"]
    assert not report.violations  # same shapes, no replicas involved: only the comparison can see it
    differing = {"model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"}
    assert {t.name for t in report.weights.mismatches} == differing
    assert {(r.rank, r.tensor) for r in report.weights.ranks} == {
        (rank, f"transformer.layers.1.mlp.{name}.weight") for rank in range(2) for name in ("fc", "gate")
    }
    assert not report.forward.identical and report.forward.differing_sequences == [0, 1]
    assert report.localization.module == "model.layers.1.mlp.gate_proj"
    assert report.localization.scope == "model.layers.1"
    assert set(report.localization.differing_tensors) == differing
    assert saved["localization"]["module"] == "model.layers.1.mlp.gate_proj"
    mismatch = next(t for t in saved["weights"]["tensors"] if t["name"] == "model.layers.1.mlp.gate_proj.weight")
    assert mismatch["equal"] is False and mismatch["max_abs_diff"] > 0 and mismatch["first_diff_index"] is not None


@pytest.mark.parametrize("mode", ["sharded", "reassembled"])
def test_each_mode_alone_catches_gate_up_swap_and_reports_only_itself(tmp_path, llama, mode):
    ckpt = converted(llama, tmp_path / "ckpt", dtype="float32", tp_size=2)
    for rank in range(2):
        rewrite_rank(ckpt, rank, swap_fc_and_gate)
    report_file = tmp_path / "r.json"
    result = invoke("verify", "--model_dir", llama, "--checkpoint_dir", ckpt, *FAST_ARGS, "--mode", mode, "--report", report_file)
    assert result.exit_code == EXIT_FAILED, result.output
    saved = json.loads(report_file.read_text())
    other = "reassembled" if mode == "sharded" else "sharded"
    assert saved["mode"] == mode and saved[other] is None and not saved[mode]["passed"]
    if mode == "sharded":
        assert saved["sharded"]["localization"]["first_diverging"] == "layer 1"


def test_unknown_mode_is_bad_input(tmp_path, llama):
    ckpt = converted(llama, tmp_path / "ckpt", dtype="float32")
    result = invoke("verify", "--model_dir", llama, "--checkpoint_dir", ckpt, *FAST_ARGS, "--mode", "fast")
    assert result.exit_code == 2 and "--mode" in result.stderr


@pytest.mark.parametrize("ranks", ["all", "one"])
def test_norm_scaled(tmp_path, llama, ranks):
    """pp=2 over 3 layers: rank file 1's local layer 0 is global layer 2."""
    ckpt = converted(llama, tmp_path / "ckpt", dtype="float16", tp_size=2, pp_size=2)
    name = "transformer.layers.0.input_layernorm.weight"

    def scale(tensors):
        tensors[name] = tensors[name] * 1.01

    for rank in ([2, 3] if ranks == "all" else [3]):
        rewrite_rank(ckpt, rank, scale)
    code, report, _ = verify_both(llama, ckpt, tmp_path)
    assert code == EXIT_FAILED and not report.passed
    if ranks == "one":  # the replicas of a replicated tensor disagree; the rebuild takes tp rank 0's copy
        assert [(v.rank, v.tensor) for v in report.violations] == [(3, name)]
        assert "differs from tp rank 0's" in report.violations[0].problem
        assert report.weights.ok and report.forward.identical
    else:
        assert not report.violations
        assert [t.name for t in report.weights.mismatches] == ["model.layers.2.input_layernorm.weight"]
        assert {(r.rank, r.tensor) for r in report.weights.ranks} == {(2, name), (3, name)}
        assert report.localization.module == "model.layers.2.input_layernorm"
        assert report.localization.differing_tensors == ["model.layers.2.input_layernorm.weight"]


def test_gemma_norm_stored_without_its_plus_one(tmp_path):
    model = build_tiny_model(tmp_path / "model", "GemmaForCausalLM", seed=4, num_hidden_layers=2)
    ckpt = converted(model, tmp_path / "ckpt", dtype="float32", tp_size=2)
    name = "transformer.layers.1.post_layernorm.weight"
    for rank in range(2):
        rewrite_rank(ckpt, rank, lambda t: t.update({name: t[name] - 1.0}))
    code, report, _ = verify_both(model, ckpt, tmp_path)
    assert code == EXIT_FAILED and not report.violations
    assert [t.name for t in report.weights.mismatches] == ["model.layers.1.post_attention_layernorm.weight"]
    assert report.localization.module == "model.layers.1.post_attention_layernorm"


def test_two_kv_heads_swapped(tmp_path, llama_kv4):
    ckpt = converted(llama_kv4, tmp_path / "ckpt", dtype="bfloat16", tp_size=2)
    q_rows, head = 4 * 8, 8  # local: 4 query heads, then 2 key heads, then 2 value heads, each 8 rows

    def swap_k_heads(tensors):
        qkv = tensors["transformer.layers.0.attention.qkv.weight"]
        k0, k1 = qkv[q_rows : q_rows + head].clone(), qkv[q_rows + head : q_rows + 2 * head].clone()
        qkv[q_rows : q_rows + head], qkv[q_rows + head : q_rows + 2 * head] = k1, k0

    rewrite_rank(ckpt, 1, swap_k_heads)
    code, report, saved = verify_both(llama_kv4, ckpt, tmp_path)
    assert code == EXIT_FAILED and not report.violations
    assert [t.name for t in report.weights.mismatches] == ["model.layers.0.self_attn.k_proj.weight"]
    # rank 1 holds global KV heads 2 and 3: the first differing row is the first row of head 2
    assert report.weights.mismatches[0].first_diff_index[0] == 2 * head
    assert [(r.rank, r.tensor) for r in report.weights.ranks] == [(1, "transformer.layers.0.attention.qkv.weight")]
    assert report.weights.ranks[0].first_diff_index[0] == q_rows
    assert report.localization.module == "model.layers.0.self_attn.k_proj"
    assert saved["weights"]["rank_differences"][0]["rank"] == 1


def test_kv_replica_differs_from_its_twin(tmp_path, llama):
    """tp=4 over 2 KV heads: ranks 0 and 1 both hold KV head 0."""
    ckpt = converted(llama, tmp_path / "ckpt", dtype="float16", tp_size=4)
    q_rows = 16  # one query head of dim 16 per rank, then k, then v

    def nudge_v(tensors):
        tensors["transformer.layers.2.attention.qkv.weight"][q_rows + 16 + 3, 5] += 0.25

    rewrite_rank(ckpt, 1, nudge_v)
    code, report, saved = verify_both(llama, ckpt, tmp_path)
    assert code == EXIT_FAILED
    assert [(v.rank, v.tensor) for v in report.violations] == [(1, "transformer.layers.2.attention.qkv.weight")]
    assert "v replica of KV head 0 differs from tp rank 0's" in report.violations[0].problem
    assert saved["violations"][0]["rank"] == 1
    assert "1 reassembly violation(s)" in report.failures


def test_nonzero_padding_row(tmp_path, llama):
    """vocab 97 over tp=2: 49 rows per rank, rank 1's last row is padding."""
    ckpt = converted(llama, tmp_path / "ckpt", dtype="bfloat16", tp_size=2)

    def fill_padding(tensors):
        tensors["lm_head.weight"][48] = 0.5

    rewrite_rank(ckpt, 1, fill_padding)
    code, report, _ = verify_both(llama, ckpt, tmp_path)
    assert code == EXIT_FAILED
    assert [(v.rank, v.tensor) for v in report.violations] == [(1, "lm_head.weight")]
    assert "padding row 97 (local row 48) is not zero" in report.violations[0].problem
    assert report.weights.ok and report.forward.identical  # the rebuilt model drops padding: only the check sees it


@pytest.mark.parametrize("fault", ["dropped", "extra"])
def test_tensor_set_changed(tmp_path, llama, fault):
    ckpt = converted(llama, tmp_path / "ckpt", dtype="float16", tp_size=2, pp_size=2)
    if fault == "dropped":
        name, rank, problem = "transformer.layers.1.mlp.proj.weight", 0, "tensor is missing"
        rewrite_rank(ckpt, rank, lambda t: t.pop(name))
    else:
        name, rank, problem = "transformer.layers.0.attention.rotary.weight", 3, "unexpected extra tensor"
        rewrite_rank(ckpt, rank, lambda t: t.update({name: torch.zeros(4, dtype=torch.float16)}))
    code, report, saved = verify_both(llama, ckpt, tmp_path)
    assert code == EXIT_FAILED
    assert [(v.rank, v.tensor, v.problem) for v in report.violations] == [(rank, name, problem)]
    assert report.weights is None and report.forward is None and saved["weights"] is None
    assert [(o.check, o.status.value) for o in report.checks] == [
        ("reassembly", "failed"), *((check, "not run") for check in ("config", "weights", "forward", "precision"))]
    assert "could not be rebuilt" in report.checks[-1].reason


def test_wrong_rotary_base_in_config_is_localized(tmp_path, llama):
    ckpt = converted(llama, tmp_path / "ckpt", dtype="float32", tp_size=2)
    config = json.loads((ckpt / "config.json").read_text())
    config["rotary_base"] = 500000.0
    (ckpt / "config.json").write_text(json.dumps(config))
    restamp_manifest(ckpt)
    code, report, _ = verify_both(llama, ckpt, tmp_path)
    assert code == EXIT_FAILED and report.weights.ok
    assert report.config_differences and report.config_differences[0].startswith("rope_parameters")
    assert not report.forward.identical
    assert report.localization.module == "model.rotary_emb"


def test_checkpoint_of_another_model_fails(tmp_path, llama):
    other = build_tiny_model(tmp_path / "other", "LlamaForCausalLM", seed=99)
    ckpt = converted(other, tmp_path / "ckpt", dtype="float16")
    code, report, _ = verify_both(llama, ckpt, tmp_path)
    assert code == EXIT_FAILED
    assert len(report.weights.mismatches) == len(report.weights.tensors)
    assert report.localization.module == "model.embed_tokens"


# --- the precision effect -------------------------------------------------------------------------------------

def test_fp16_overflow_fails_the_precision_check(tmp_path, llama):
    """A weight scaled by 1e5 overflows float16 activations; bfloat16 has float32's range and passes."""
    model = tmp_path / "model"
    model.mkdir()
    for f in llama.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    rewrite_source(model, lambda t: t.update({"model.layers.1.mlp.down_proj.weight": t["model.layers.1.mlp.down_proj.weight"] * 1e5}))
    fp16 = verify_equivalence(model, converted(model, tmp_path / "fp16", dtype="float16"), FAST)
    assert fp16.weights.ok and fp16.forward.identical  # the conversion itself is exact
    assert not fp16.passed and not fp16.precision.ok
    assert fp16.precision.metrics.nonfinite > 0 and not fp16.precision.checks["nonfinite"].passed
    assert fp16.precision.first_nonfinite_module.startswith("model.layers.1.")
    assert any("the cost of float16: nonfinite" in f for f in fp16.failures)
    report_file = tmp_path / "fp16.json"
    result = invoke("verify", "--model_dir", model, "--checkpoint_dir", tmp_path / "fp16", *FAST_ARGS, "--report", report_file)
    assert result.exit_code == EXIT_FAILED
    saved = json.loads(report_file.read_text(), parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))["reassembled"]
    assert saved["precision"]["checks"]["nonfinite"]["passed"] is False and saved["precision"]["metrics"]["kl_mean"] == "nan"
    bf16 = verify_equivalence(model, converted(model, tmp_path / "bf16", dtype="bfloat16"), FAST)
    assert bf16.passed, bf16.failures


# --- bad input ------------------------------------------------------------------------------------------------

def test_bad_input_exits_2(tmp_path, llama):
    ckpt = converted(llama, tmp_path / "ckpt", dtype="float16")
    cases = [
        ("verify", "--checkpoint_dir", ckpt),
        ("verify", "--model_dir", llama, "--checkpoint_dir", tmp_path / "absent"),
        ("verify", "--model_dir", tmp_path / "absent", "--checkpoint_dir", ckpt, "--device", "cpu"),
        ("verify", "--model_dir", llama, "--checkpoint_dir", ckpt, "--device", "tpu"),
        ("verify", "--model_dir", llama, "--checkpoint_dir", ckpt, "--seq-len", "0"),
        ("verify", "--model_dir", llama, "--checkpoint_dir", ckpt, "--report", tmp_path / "no" / "r.json"),
        ("check", "--demo", "--model_dir", llama),
        ("check",),
        ("check", "--model_dir", llama, "--tp_size", "3"),
    ]
    if not torch.cuda.is_available():
        cases.append(("verify", "--model_dir", llama, "--checkpoint_dir", ckpt, "--device", "cuda"))
    for args in cases:
        result = invoke(*args)
        assert result.exit_code == EXIT_BAD_INPUT, (args, result.output)
        assert "Traceback" not in result.output and "error:" in result.stderr


def test_progress_counts_every_source_byte_once_for_the_whole_reassembled_mode(tmp_path):
    """The reassembled mode reads the source once, in one lock step, for the weights comparison and every run
    (the source in the checkpoint dtype and in float32, the rebuilt model over the rank files): progress reports
    each source byte exactly once."""
    from shardproof.converter.source import open_source
    from shardproof.verify.verification import verify_checkpoint

    model = build_tiny_model(tmp_path / "m", "LlamaForCausalLM", seed=3)
    source = open_source(model)
    ckpt = converted(model, tmp_path / "ckpt", dtype="bfloat16", tp_size=2)
    seen: list[int] = []
    result = verify_checkpoint(model, ckpt, "reassembled", BatchOptions("cpu", num_sequences=1, seq_len=8),
                               progress=seen.append)
    assert result.passed and all(n > 0 for n in seen)
    assert sum(seen) == sum(source.nbytes(name) for name in source.shapes)


def test_a_users_limit_on_the_dtypes_cost_fails_the_run_only_when_given(tmp_path):
    """The reassembled mode's dtype cost is the model's own (its logits are the checkpoint's bit for bit): reported,
    and failed only by a limit the user states."""
    from shardproof.verify.thresholds import UserLimits

    model = build_tiny_model(tmp_path / "model", "LlamaForCausalLM", seed=3)
    ckpt = converted(model, tmp_path / "ckpt", dtype="bfloat16", tp_size=2)
    free = verify_equivalence(model, ckpt, FAST)
    assert free.passed and free.precision.metrics.kl_mean > 0
    limits = UserLimits(max_kl=free.precision.metrics.kl_mean / 2, min_cosine=-1.0)
    strict = verify_equivalence(model, ckpt, BatchOptions(FAST.device, FAST.num_sequences, FAST.seq_len, FAST.seed,
                                                          limits=limits))
    assert not strict.passed and strict.failures == [strict.failures[0]]
    assert "kl_mean" in strict.failures[0] and "user limit" in strict.failures[0]
    assert strict.precision.checks["cosine_min"].passed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU read and compare paths run on a GPU only")
def test_on_a_gpu_a_clean_conversion_passes_and_a_changed_tensor_is_found_as_on_the_host(tmp_path, llama):
    """The weights stage reads and compares on the GPU (a difference there is decided on the host), the models
    stream through it: the verdicts must be the host's."""
    gpu = BatchOptions(device="cuda", num_sequences=2, seq_len=32)
    ckpt = converted(llama, tmp_path / "ckpt", dtype="bfloat16", tp_size=2, pp_size=2)
    assert verify_equivalence(llama, ckpt, gpu).passed
    name = "transformer.layers.0.input_layernorm.weight"
    for rank in (2, 3):
        rewrite_rank(ckpt, rank, lambda tensors: tensors.__setitem__(name, tensors[name] * 1.01))
    on_gpu, on_host = verify_equivalence(llama, ckpt, gpu), verify_equivalence(llama, ckpt, FAST)
    assert [t.name for t in on_gpu.weights.mismatches] == [t.name for t in on_host.weights.mismatches] == [
        "model.layers.2.input_layernorm.weight"]
    assert on_gpu.weights.mismatches[0].first_diff_index == on_host.weights.mismatches[0].first_diff_index
    assert not on_gpu.forward.identical and on_gpu.localization.module == "model.layers.2.input_layernorm"


def test_a_tied_lm_head_copy_that_differs_from_the_embedding_is_a_reassembly_violation(tmp_path):
    """The checkpoint stores a tied model's lm_head as a copy of the embedding; no unit of the rebuilt model loads
    that copy (the model ties it to the embedding), so it is inverted after the run and checked against the
    embedding it must equal."""
    model = build_tiny_model(tmp_path / "m", "LlamaForCausalLM", seed=3, tie_word_embeddings=True)
    ckpt = converted(model, tmp_path / "ckpt", dtype="float32")
    assert verify_equivalence(model, ckpt, FAST).passed

    def nudge(tensors) -> None:
        tensors["lm_head.weight"][0, 0] += 1.0

    rewrite_rank(ckpt, 0, nudge)
    report = verify_equivalence(model, ckpt, FAST)
    assert not report.passed
    assert [v.problem for v in report.violations] == ["is tied to transformer.vocab_embedding.weight but differs from it"]


def test_a_checkpoint_of_a_shallower_model_fails_against_the_deeper_one_instead_of_not_running(tmp_path):
    """Verified against another model (one more layer), the two models' units differ, so they cannot run in lock
    step: the weights are compared on their own and each model runs apart, and the mode fails (never "not run")."""
    shallow = build_tiny_model(tmp_path / "a", "LlamaForCausalLM", seed=3, num_hidden_layers=2)
    deep = build_tiny_model(tmp_path / "b", "LlamaForCausalLM", seed=3, num_hidden_layers=3)
    report = verify_equivalence(deep, converted(shallow, tmp_path / "ckpt", dtype="float32"), FAST)
    assert not report.passed and not report.forward.identical
    missing = {t.name for t in report.weights.mismatches if t.problem == "missing from the checkpoint"}
    assert missing and all(name.startswith("model.layers.2.") for name in missing)
